# vqad: two entry points, each self-sufficient on a fresh machine with Python 3.10+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install bench-sdf bench-format bench-nerf bench-rd bench-speed bench-fuzz bench-batch bench-tsdf bench-view bench-scene clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing below can pull a CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[test,ray,tsdf,view,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vqad demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-sdf: $(STAMP)
	$(PY) benchmarks/bench_sdf.py --out docs/benchmarks/sdf.md

bench-format: $(STAMP)
	$(PY) benchmarks/bench_format.py --out docs/benchmarks/format.md
	$(PY) benchmarks/bench_format.py --out docs/benchmarks/format-rate.md --rate-weight 1e-6 --work out/bench-format-rate

# bench-nerf: lego and fern (nerf.md), then the generated room at aabb_scale 4 and 16 and the object
# alone (scene.md, issue 22's rows); bench-scene runs the second part alone.
bench-nerf: $(STAMP)
	$(PY) benchmarks/bench_nerf.py --out docs/benchmarks/nerf.md
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_scene.py --out docs/benchmarks/scene.md

bench-rd: $(STAMP)
	$(PY) benchmarks/bench_rd.py --out docs/benchmarks

bench-speed: $(STAMP)
	$(PY) benchmarks/bench_speed.py --threads 2 --profile --out docs/benchmarks/speed.md
	$(PY) benchmarks/bench_threads.py --out docs/benchmarks/threads.md

bench-fuzz: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/fuzz_campaign.py --out docs/benchmarks/fuzz.md

bench-batch: $(STAMP)
	$(PY) benchmarks/bench_batch.py --out docs/benchmarks/batch.md

bench-tsdf: $(STAMP)
	$(PY) benchmarks/bench_tsdf.py --out docs/benchmarks/tsdf.md

bench-view: $(STAMP)
	$(PY) benchmarks/bench_view.py --out docs/benchmarks/view.md

bench-scene: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_scene.py --out docs/benchmarks/scene.md

clean:
	rm -rf $(VENV) out build src/*.egg-info
