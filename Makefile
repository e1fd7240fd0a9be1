# streamqueue — developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$(PATH)
VERSION := $(shell cat VERSION)
IMAGE_REPO ?= streamqueue
PYTEST_ARGS ?=

.PHONY: help setup tools test test-fast bench lint crds cluster cluster-down demo images base-image push-images e2e-kind clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: ## install redis-server, the Python venv and the pinned Kubernetes tools
	bash hack/setup.sh

tools: ## build (or reuse) etcd, kube-apiserver, kube-controller-manager, kubectl, helm, kind
	bash hack/tools.sh

test: setup ## set up and run every test (unit, Redis and control-plane integration)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: ## unit tests only, no setup
	$(PY) -m pytest -m "not kube and not slow" $(PYTEST_ARGS)

bench: setup ## benchmarks: worker throughput vs the article's loop, client latency, operator reaction
	$(PY) -m bench

lint: ## ruff, mypy, helm lint and actionlint (.github/workflows)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	helm lint charts/streamqueue-operator
	actionlint

crds: ## regenerate crds/ and the chart's CRD from the pydantic models
	$(PY) -m streamqueue_operator.crdgen --write

cluster: setup ## start the local control plane in the background (.cluster/kubeconfig)
	$(PY) -m streamqueue_harness.controlplane up --dir .cluster

cluster-down: ## stop the local control plane
	$(PY) -m streamqueue_harness.controlplane down --dir .cluster

demo: setup ## local demo: Redis + control plane + operator + workers, scale out and back in
	$(PY) -m streamqueue_harness.demo $(DEMO_ARGS)

images: ## build the worker, operator and pause images (docker, podman or buildah; no registry needed)
	IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) bash hack/images.sh build

base-image: ## build the local Python base image from Debian packages (mmdebstrap)
	IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) bash hack/images.sh base-image

push-images: ## push the built worker and operator images to IMAGE_REPO's registry (log in first)
	IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) bash hack/images.sh push

e2e-kind: ## full-cluster test on kind (needs Docker): install chart, drive load, assert scaling
	bash hack/e2e-kind.sh

clean: ## remove local state (venv, tool links, cluster dir); the tool cache is kept
	rm -rf $(VENV) .tools .cluster .demo
