# streamqueue — developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$(PATH)
VERSION := $(shell cat VERSION)
IMAGE_REPO ?= streamqueue
# Where the images' Python base comes from: offline = made here from Debian packages (mmdebstrap),
# no registry ever asked; auto = python:3.11-slim-bookworm when it is present or can be pulled.
IMAGE_BASE ?= offline
PYTEST_ARGS ?=
NODES ?= 1

.PHONY: help setup tools test test-fast bench lint crds cluster node cluster-down demo images base-image push-images e2e-node e2e-cluster e2e-kind clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: ## install Debian packages (redis-server, containerd, runc, CNI plugins), the venv, the pinned tools
	bash hack/setup.sh

tools: ## build (or reuse) etcd, the Kubernetes control plane and node binaries, kubectl, CoreDNS, helm, kind
	bash hack/tools.sh

test: setup images ## set up and run every test (unit, Redis, control plane, the real node end to end)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: ## unit tests only, no setup
	$(PY) -m pytest -m "not kube and not slow" $(PYTEST_ARGS)

bench: setup images ## benchmarks (bench/__main__.py lists them): worker throughput, streamed-token cost, operator cost and reaction, HA failover, gateway, node cold start; `python -m bench NAME` runs one
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

node: setup images ## control plane + a real node (containerd, kubelet) in a namespace of its own, in the background; NODES=2 for two
	$(PY) -m streamqueue_harness.node up --dir .cluster --nodes $(NODES)

cluster-down: ## stop what `make cluster` or `make node` started; leaves no process, mount or namespace
	$(PY) -m streamqueue_harness.node down --dir .cluster

demo: ## local demo: Redis + control plane + operator + workers, scale out and back in
	SKIP_LLAMA=1 bash hack/setup.sh  # the demo needs no model server
	$(PY) -m streamqueue_harness.demo $(DEMO_ARGS)

images: ## build the worker, operator, gateway, pause, coredns and redis images (docker, podman or buildah; no registry needed)
	IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) BASE=$(IMAGE_BASE) bash hack/images.sh build

base-image: ## build the local Python base image from Debian packages (mmdebstrap)
	IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) bash hack/images.sh base-image

push-images: ## push the built worker, operator and gateway images to IMAGE_REPO's registry (log in first)
	IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) bash hack/images.sh push

e2e-node: setup images ## helm install, a burst from 20 users, scale out and back to 0 on the real node
	rm -f .cluster/e2e-node.txt
	$(PY) -m pytest tests/node -s $(PYTEST_ARGS)
	@cat .cluster/e2e-node.txt

e2e-cluster: setup images ## two nodes, the HA operator: leader killed, a node drained, the leader's node lost; nothing lost
	rm -f .cluster/e2e-cluster.txt
	$(PY) -m pytest tests/cluster -s $(PYTEST_ARGS)
	@cat .cluster/e2e-cluster.txt

e2e-kind: ## full-cluster test on kind (needs Docker): install chart, drive load, assert scaling
	bash hack/e2e-kind.sh

clean: ## remove local state (venv, tool links, cluster dir); the tool cache is kept
	rm -rf $(VENV) .tools .cluster .demo
