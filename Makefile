# gradcourse: `make lab` to learn, `make test` to check. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LAB_ARGS ?=
# JupyterLab refuses to run as root unless told; containers and cloud VMs often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PROFILE ?= auto
# processes running the unit tests and the notebooks under nbval (pytest-xdist; one notebook
# each): each computes on one thread at ci, so two keep a 2-core machine busy
TEST_PROCS ?= 2

.PHONY: lab lab-student test test-unit test-notebooks test-student test-browser test-sweep chromium data data-or-warn lint format reproduce scorecard site student clean help

help:
	@echo "make lab        create .venv, install, open the course in JupyterLab (LAB_ARGS=--no-browser on a headless machine)"
	@echo "make test       create .venv, install with test extras, lint, unit tests, every notebook under nbval (profile ci)"
	@echo "make test-browser  every notebook in JupyterLab in headless Chromium: run all, move each widget"
	@echo "make reproduce  run every notebook (PROFILE=ci|cpu|gpu, default auto), record results/<profile>/, refresh the README scorecard"
	@echo "make site       the course as a static site in build/site/<profile>/ (PROFILE=ci for a quick build)"
	@echo "make student    the student version (exercise solutions removed, nbgrader) in build/student/"
	@echo "make lab-student   JupyterLab on the student version"
	@echo "make data       check that Fashion-MNIST is on disk (apt-get install as root when missing)"
	@echo "make test-sweep unit tests and notebooks under each CPU capability and 1/2 threads"
	@echo "make format     apply ruff's formatter and autofixes"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-browser: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test,browser,site]'
	@touch $@ $(VENV)/.installed $(VENV)/.installed-test $(VENV)/.installed-site

$(VENV)/.installed-site: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[site]'
	@touch $@ $(VENV)/.installed

# Fashion-MNIST, the course's real dataset: Debian's package puts it in /usr/share/datasets/.
# When it is missing, root with apt-get installs it (as test-browser does Chromium); anyone
# else is told the two ways to get it (apt, or torchvision's download).
DATA_CHECK := $(BIN)/python -m gradcourse data

data: $(VENV)/.installed
	@if ! $(DATA_CHECK) >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Fashion-MNIST with apt-get (package dataset-fashion-mnist)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi
	@$(DATA_CHECK) || { echo "Get it with: sudo apt-get install dataset-fashion-mnist"; \
		echo "         or: $(BIN)/python -m gradcourse data --download   (online; torchvision)"; exit 1; }

# Targets that run notebooks check for it too, but go on without it (with the hints above):
# a notebook that needs it stops with the same message.
data-or-warn: $(VENV)/.installed
	@$(MAKE) --no-print-directory data || echo "(continuing: a notebook that needs Fashion-MNIST will say what is missing)"

lab: data-or-warn
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG) $(LAB_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check gradcourse tests benchmarks notebooks
	$(BIN)/ruff format --check gradcourse tests benchmarks notebooks

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix gradcourse tests benchmarks notebooks
	$(BIN)/ruff format gradcourse tests benchmarks notebooks

test-unit: $(VENV)/.installed-test
	GRADCOURSE_PROFILE=ci $(BIN)/python -m pytest tests/ --ignore=tests/browser -q --durations=10 \
		-p no:cacheprovider -n $(TEST_PROCS)

# The notebooks under nbval at ci, then their verdicts against the recorded results/ci/.
test-notebooks: $(VENV)/.installed-test
	rm -rf build/nbval-ci
	GRADCOURSE_PROFILE=ci GRADCOURSE_BUILD=$(CURDIR)/build/nbval-ci \
		$(BIN)/python -m pytest --nbval-lax notebooks/ -q --durations=0 -p no:cacheprovider \
		-n $(TEST_PROCS) --dist loadfile
	$(BIN)/python -m gradcourse compare build/nbval-ci --profile ci

# The student version (solutions removed by nbgrader) executed at ci: every exercise must say
# "not attempted" and every notebook run to its end on the library's implementations.
test-student: $(VENV)/.installed-test
	rm -rf build/student
	GRADCOURSE_PROFILE=ci $(BIN)/python -m gradcourse student --run --profile ci --quiet --jobs $(TEST_PROCS)

test: data lint test-unit test-notebooks test-student

# Results must not depend on the CPU's vector unit or the thread count: the unit tests and the
# notebooks under each ATEN_CPU_CAPABILITY (default, avx2, and the machine's own) with 1 and 2
# threads (GRADCOURSE_THREADS overrides every profile's thread count), each notebook run with an
# empty results cache, its verdicts compared with results/ci/. About 6x `make test`.
SWEEP_CAPS ?= default avx2 native
SWEEP_THREADS ?= 1 2
test-sweep: $(VENV)/.installed-test data
	@set -e; for cap in $(SWEEP_CAPS); do for t in $(SWEEP_THREADS); do \
		echo "== ATEN_CPU_CAPABILITY=$$cap, $$t thread(s) =="; \
		if [ "$$cap" = native ]; then unset ATEN_CPU_CAPABILITY; else export ATEN_CPU_CAPABILITY=$$cap; fi; \
		export GRADCOURSE_THREADS=$$t OMP_NUM_THREADS=$$t; \
		out=$(CURDIR)/build/sweep/$$cap-$$t; rm -rf $$out; mkdir -p $$out/data; \
		$(BIN)/python -c "import torch; print('torch uses', torch.backends.cpu.get_cpu_capability(), 'with', torch.get_num_threads(), 'thread(s)')"; \
		GRADCOURSE_PROFILE=ci $(BIN)/python -m pytest tests/ --ignore=tests/browser -q -p no:cacheprovider; \
		GRADCOURSE_PROFILE=ci GRADCOURSE_DATA=$$out/data GRADCOURSE_BUILD=$$out \
			$(BIN)/python -m pytest --nbval-lax notebooks/ -q -p no:cacheprovider; \
		$(BIN)/python -m gradcourse compare $$out --profile ci; \
	done; done

# Playwright drives the system Chromium (it never downloads a browser of its own). TEST_PROCS
# processes, each with its own JupyterLab and Chromium, take the tests as they free up.
test-browser: $(VENV)/.installed-browser data
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| [ -n "$$GRADCOURSE_CHROMIUM" ] || $(MAKE) --no-print-directory chromium
	GRADCOURSE_PROFILE=ci $(BIN)/python -m pytest tests/browser -q -p no:cacheprovider \
		-n $(TEST_PROCS) --dist worksteal --durations=20

chromium:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "Chromium is missing. Install it (Debian/Ubuntu: sudo apt-get install chromium;"; \
		echo "macOS: brew install --cask chromium) or set GRADCOURSE_CHROMIUM=/path/to/chrome."; \
		exit 1; \
	fi

# Run every notebook at PROFILE and record its verdicts in results/<profile>/ (committed), then
# refresh the README's scorecard. `make reproduce PROFILE=ci` after changing a notebook.
reproduce: $(VENV)/.installed data
	$(BIN)/python -m gradcourse run --profile $(PROFILE) --record
	$(BIN)/python -m gradcourse report --results --update-readme README.md

scorecard: $(VENV)/.installed
	$(BIN)/python -m gradcourse report --results --update-readme README.md

# The course as a static site in build/site/<profile>/ (notebooks executed when stale).
SITE_PROFILE ?= $(if $(filter auto,$(PROFILE)),cpu,$(PROFILE))
site: $(VENV)/.installed-site data
	$(BIN)/python -m gradcourse site --profile $(SITE_PROFILE)

# The student version of every notebook: each exercise's solution replaced by a stub.
student: $(VENV)/.installed-test
	$(BIN)/python -m gradcourse student

# JupyterLab on the student version (built first).
lab-student: student data-or-warn
	$(BIN)/jupyter lab build/student/ $(ROOT_FLAG) $(LAB_ARGS)

clean:
	rm -rf build .pytest_cache
