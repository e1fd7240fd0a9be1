#!/usr/bin/env bash
# Build the pinned Kubernetes tool chain (etcd, kube-apiserver, kube-controller-manager, kubectl,
# kube-scheduler, kubelet, kube-proxy, CoreDNS, helm, kind, actionlint, an OpenTelemetry Collector) from the Go module proxy into a cache
# outside the repository, keyed by version, and link it into .tools/bin (the Prometheus Operator's CRDs,
# files, into .tools/prometheus-crds). A warm cache makes this a
# no-op that takes well under a second.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every staging module with a local
# path. We build it from a throwaway consumer module that requires k8s.io/kubernetes and replaces each
# staging module (derived from that release's own go.mod) with its published v0.X.Y tag.
set -euo pipefail

KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.20.2}"
KIND_VERSION="${KIND_VERSION:-v0.30.0}"
ACTIONLINT_VERSION="${ACTIONLINT_VERSION:-v1.7.12}"  # lints .github/workflows (make lint)
# The node's cluster DNS; v1.14.7 is built with client-go v0.35.4, the same as KUBERNETES_VERSION.
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
# The trace tests' collector (tests/worker/test_tracing.py): core v0.161.0 with contrib's fileexporter of
# the same release (the newest fileexporter that resolves here).
OTELCOL_VERSION="${OTELCOL_VERSION:-v0.161.0}"
# The Prometheus Operator's monitoring.coreos.com CRDs, for the test that applies the chart's
# ServiceMonitor, PodMonitor and PrometheusRule to a real API server (tests/chart/test_chart_monitoring_kube.py).
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
PROMETHEUS_CRDS="servicemonitors podmonitors prometheusrules"
GO_MIN_VERSION="1.25"
# The control plane, plus what runs real pods beside it: kube-scheduler, kubelet, kube-proxy.
KUBERNETES_COMMANDS="kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy"
GO_FALLBACK_VERSION="${GO_FALLBACK_VERSION:-1.25.5}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STREAMQUEUE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamqueue-tools}"
BIN="$ROOT/.tools/bin"
mkdir -p "$CACHE" "$BIN"

log() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# One build at a time per cache: CI and developers on the same machine share it, and two builds
# would race on the consumer modules and the half-written bin.tmp directories.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "waiting for another build using $CACHE to finish"
  flock 9
fi

go_ok() {
  command -v "$1" >/dev/null 2>&1 || return 1
  local v; v="$("$1" env GOVERSION 2>/dev/null | sed 's/^go//')"
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$GO_MIN_VERSION" "$v" | sort -V | head -1)" = "$GO_MIN_VERSION" ]
}

# Use the machine's Go if recent enough; otherwise fetch an official toolchain from the Go module
# proxy (it serves golang.org/toolchain as an ordinary module zip).
ensure_go() {
  if go_ok go; then GO=go; return; fi
  local dir="$CACHE/go-$GO_FALLBACK_VERSION"
  if [ ! -x "$dir/bin/go" ]; then
    local proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
    local mod="v0.0.1-go${GO_FALLBACK_VERSION}.linux-amd64"
    log "installing Go $GO_FALLBACK_VERSION from the module proxy"
    local tmp; tmp="$(mktemp -d)"
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "$proxy/golang.org/toolchain/@v/$mod.zip" "$tmp/go.zip"  # python3, not curl: slim images lack curl
    (cd "$tmp" && python3 -m zipfile -e go.zip x)
    rm -rf "$dir"; mv "$tmp/x/golang.org/toolchain@$mod" "$dir"; chmod +x "$dir"/bin/* "$dir"/pkg/tool/*/*
    rm -rf "$tmp"
  fi
  GO="$dir/bin/go"
}

# The cache is keyed by version, and a stamp of the build recipe (the source of build_NAME, "-" read
# as "_", and of the go_install or go_build_module helper it calls) invalidates it when the recipe
# changes (new ldflags, say) without a version bump.
recipe() {
  local fns=("build_${1//-/_}") text helper
  text="$(declare -f "${fns[0]}")"
  for helper in go_install go_build_module; do
    [[ $text == *"$helper "* ]] && fns+=("$helper")
  done
  declare -f "${fns[@]}" | sha256sum | cut -c1-16
}

built() {  # built NAME VERSION FILE...: NAME's cache has the current recipe stamp and each FILE in it
  local name="$1" d="$CACHE/$1-$2"; shift 2
  [ "$(cat "$d/recipe" 2>/dev/null)" = "$(recipe "$name")" ] || return 1
  for f in "$@"; do [ -f "$d/$f" ] || return 1; done
}

link() {
  local d="$CACHE/$1-$2/bin"; shift 2
  for b in "$@"; do ln -sf "$d/$b" "$BIN/$b"; done
}

json_field() {  # json_field NAME < `go mod download -json` output
  sed -n "s/^\s*\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p"
}

consumer_module() {  # dir module-path go-version
  mkdir -p "$1"; (cd "$1" && rm -f go.mod go.sum && "$GO" mod init "$2" >/dev/null 2>&1 && "$GO" mod edit -go="$3")
}

# Build PACKAGE as BINARY in the consumer module $CACHE/NAME-VERSION/src (made by consumer_module, its
# source file written by the caller): require each REQUIRE, resolve the rest (go mod tidy), build
# into bin.tmp and swap that in whole, so an interrupted build never looks built.
go_build_module() {  # go_build_module NAME VERSION BINARY PACKAGE REQUIRE...
  local src="$CACHE/$1-$2/src" out="$CACHE/$1-$2/bin" binary="$3" package="$4"; shift 4
  (
    cd "$src"
    "$GO" mod edit "${@/#/-require=}"
    "$GO" mod tidy -e >/dev/null
    mkdir -p "$out.tmp"
    CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w" -o "$out.tmp/$binary" "$package"
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# `go install PACKAGE@VERSION` into NAME's cache, by way of bin.tmp as above; LDFLAGS default "-s -w".
go_install() {  # go_install NAME VERSION PACKAGE [LDFLAGS]
  local out="$CACHE/$1-$2/bin"
  log "$1 $2: go install $3"
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" CGO_ENABLED=0 "$GO" install -trimpath -ldflags "${4:--s -w}" "$3@$2"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_kubernetes() {
  local v="$KUBERNETES_VERSION" out="$CACHE/kubernetes-$KUBERNETES_VERSION/bin"
  local work="$CACHE/kubernetes-$v/src" minor="${v#v1.}"; minor="${minor%%.*}"
  local staging="v0.${v#v1.}"
  log "kubernetes $v: resolving k8s.io/kubernetes and its staging modules"
  consumer_module "$work" streamqueue.local/kubebuild 1.25.0
  local info gomod released
  info="$(cd "$work" && "$GO" mod download -json "k8s.io/kubernetes@$v")"
  gomod="$(json_field GoMod <<<"$info")"
  released="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$(json_field Info <<<"$info")")"
  local mods; mods="$(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")"
  log "kubernetes $v: replacing $(echo "$mods" | wc -l) staging modules with $staging"
  (
    cd "$work"
    "$GO" mod edit -require="k8s.io/kubernetes@$v"
    for m in $mods; do "$GO" mod edit -replace="$m=$m@$staging"; done
    # Carry over the release's own godebug default so behaviour matches the upstream build.
    "$GO" mod edit -godebug=default=go1.25 || true
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
    log "kubernetes $v: downloading modules (go mod tidy)"
    "$GO" mod tidy -e >/dev/null
    # What the release build stamps, as far as a module build can know it: the build date is the
    # release's publication time (reproducible); the commit is not in the module zip, so it is left
    # empty rather than at the source's "$Format:%H$" placeholder.
    local ld=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld="$ld -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=$released -X $pkg.gitCommit="
    done
    mkdir -p "$out.tmp"
    for cmd in $KUBERNETES_COMMANDS; do
      log "kubernetes $v: go build $cmd (cold: several minutes on 2 cores)"
      CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w $ld" -o "$out.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_etcd() {  # etcd in its own module: its release go.mod files carry local replaces too.
  local v="$ETCD_VERSION" work="$CACHE/etcd-$ETCD_VERSION/src"
  log "etcd $v: building go.etcd.io/etcd/server/v3"
  consumer_module "$work" streamqueue.local/etcdbuild 1.25.0
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$work/tools.go"
  go_build_module etcd "$v" etcd go.etcd.io/etcd/server/v3 "go.etcd.io/etcd/server/v3@$v"
}

# CoreDNS with only the plugins cluster DNS uses (the `kubernetes` plugin watching the API server,
# cache, errors, log, health, ready, loadbalance) instead of its default list of 50-odd: no forward
# (there is no upstream to forward to), no cloud back-ends, so it builds in a fraction of the time.
# dnsserver.Directives is the plugin chain's order; the names follow CoreDNS's own plugin.cfg order.
build_coredns() {
  local v="$COREDNS_VERSION" work="$CACHE/coredns-$COREDNS_VERSION/src"
  log "coredns $v: building a cluster-DNS-only CoreDNS"
  consumer_module "$work" streamqueue.local/coredns 1.25.0
  cat > "$work/main.go" <<'GO'
// CoreDNS for cluster DNS only: the plugins a kube-dns Corefile uses, in CoreDNS's chain order.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
  go_build_module coredns "$v" coredns . "github.com/coredns/coredns@$v"
}

# An OpenTelemetry Collector with only what the trace tests use: the OTLP receiver and the file
# exporter (contrib), no processors or extensions (the full contrib distribution has hundreds).
build_otelcol() {
  local v="$OTELCOL_VERSION" work="$CACHE/otelcol-$OTELCOL_VERSION/src"
  log "otelcol $v: building an OTLP-receiver + file-exporter collector"
  consumer_module "$work" streamqueue.local/otelcol 1.25.0
  cat > "$work/main.go" <<GO
// otelcol-sq: an OpenTelemetry Collector with the OTLP receiver and the file exporter only.
package main

import (
	"log"

	"github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func components() (otelcol.Factories, error) {
	var err error
	f := otelcol.Factories{Telemetry: otelconftelemetry.NewFactory()}
	if f.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](otlpreceiver.NewFactory()); err != nil {
		return f, err
	}
	f.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](fileexporter.NewFactory())
	return f, err
}

func main() {
	set := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{Command: "otelcol-sq", Description: "OTLP receiver + file exporter", Version: "$v"},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{ResolverSettings: confmap.ResolverSettings{
			ProviderFactories: []confmap.ProviderFactory{fileprovider.NewFactory()}, DefaultScheme: "file",
		}},
	}
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		log.Fatal(err)
	}
}
GO
  go_build_module otelcol "$v" otelcol-sq . "go.opentelemetry.io/collector/otelcol@$v" \
    "go.opentelemetry.io/collector/receiver/otlpreceiver@$v" \
    "github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter@$v"
}

build_helm() {
  local v="$HELM_VERSION"
  # Like helm's Makefile: the default Capabilities.KubeVersion (helm template, helm lint) is derived
  # from the client-go helm was built with, not left at the source's placeholder v1.20.
  local gomod kube_minor
  gomod="$(json_field GoMod <<<"$("$GO" mod download -json "helm.sh/helm/v3@$v")")"
  kube_minor="$(sed -n 's#^\s*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod")"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$v"
  ld="$ld -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld="$ld -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kube_minor"
  done
  go_install helm "$v" helm.sh/helm/v3/cmd/helm "$ld"
}

build_kind() { go_install kind "$KIND_VERSION" sigs.k8s.io/kind; }

build_actionlint() { go_install actionlint "$ACTIONLINT_VERSION" github.com/rhysd/actionlint/cmd/actionlint; }

# No build: the release's own CRD files (controller-gen output, example/prometheus-operator-crd/ in the
# github.com/prometheus-operator/prometheus-operator module zip), copied out of the module cache.
build_prometheus_crds() {
  local v="$PROMETHEUS_OPERATOR_VERSION" out="$CACHE/prometheus-crds-$PROMETHEUS_OPERATOR_VERSION/crds"
  log "prometheus-operator $v: the monitoring.coreos.com CRDs ($PROMETHEUS_CRDS)"
  local src
  src="$(json_field Dir <<<"$("$GO" mod download -json "github.com/prometheus-operator/prometheus-operator@$v")")"
  mkdir -p "$out.tmp"
  for c in $PROMETHEUS_CRDS; do
    install -m 0644 "$src/example/prometheus-operator-crd/monitoring.coreos.com_$c.yaml" "$out.tmp/"
  done
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# ensure NAME VERSION FILE...: build NAME unless built (FILEs relative to its cache directory), and
# stamp what was built with its recipe.
ensure() {
  local name="$1" version="$2"; shift 2
  if built "$name" "$version" "$@"; then
    log "$name $version: cached"
  else
    [ -n "${GO:-}" ] || ensure_go
    local t0=$SECONDS
    "build_${name//-/_}"
    recipe "$name" > "$CACHE/$name-$version/recipe"
    log "$name $version: built in $((SECONDS - t0))s"
  fi
}

ensure_bin() {  # ensure_bin NAME VERSION BINARIES...: ensure them, linked into .tools/bin
  local name="$1" version="$2"; shift 2
  ensure "$name" "$version" "${@/#/bin/}"
  link "$name" "$version" "$@"
}

# Files, not binaries: the directory is linked as .tools/prometheus-crds.
ensure_prometheus_crds() {
  local v="$PROMETHEUS_OPERATOR_VERSION" c files=()
  for c in $PROMETHEUS_CRDS; do files+=("crds/monitoring.coreos.com_$c.yaml"); done
  ensure prometheus-crds "$v" "${files[@]}"
  ln -sfn "$CACHE/prometheus-crds-$v/crds" "$ROOT/.tools/prometheus-crds"
}

main() {
  local want="${*:-etcd kubernetes coredns helm kind actionlint otelcol prometheus-crds}"
  for t in $want; do
    case "$t" in
      etcd) ensure_bin etcd "$ETCD_VERSION" etcd ;;
      kubernetes) ensure_bin kubernetes "$KUBERNETES_VERSION" $KUBERNETES_COMMANDS ;;
      coredns) ensure_bin coredns "$COREDNS_VERSION" coredns ;;
      helm) ensure_bin helm "$HELM_VERSION" helm ;;
      kind) ensure_bin kind "$KIND_VERSION" kind ;;
      actionlint) ensure_bin actionlint "$ACTIONLINT_VERSION" actionlint ;;
      otelcol) ensure_bin otelcol "$OTELCOL_VERSION" otelcol-sq ;;
      prometheus-crds) ensure_prometheus_crds ;;
      *) echo "unknown tool: $t (want etcd, kubernetes, coredns, helm, kind, actionlint, otelcol, prometheus-crds)" >&2; exit 2 ;;
    esac
  done
  log "tools ready in $BIN"
}

main "$@"
