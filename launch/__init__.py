"""How runs are started: multi-node launches (deepspeed runner, torchrun, Slurm), ablation sweeps, reports.

See docs/launch.md. Nothing here imports torch at module level except the probe and the report.
"""
