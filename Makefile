# One-command set-up: every target creates .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test train lint prepare clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch on disk; never an unpinned torch (it pulls a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs outputs

# The main job: the `debug` Jamba on the built-in corpus, 2 CPU processes (gloo), offline W&B, checkpoints.
# Extra Hydra overrides: make train ARGS="trainer.max_steps=300 run_name=longer"
train: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m launch.torchrun --standalone --nproc_per_node 2 -m train $(ARGS)

prepare: $(STAMP)
	$(BIN)/python -m data.prepare
