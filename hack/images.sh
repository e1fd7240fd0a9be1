#!/usr/bin/env bash
# Build the streamqueue container images with whichever engine this machine has, with no container
# registry needed (docs/images.md):
#
#   bash hack/images.sh [build]        worker, operator, pause, coredns, redis and gateway images (`make images`)
#   bash hack/images.sh base-image     the local Python base from Debian packages (mmdebstrap)
#   bash hack/images.sh gateway        only the gateway image (and the wheelhouse it installs from)
#   bash hack/images.sh pause          only the sandbox ("pause") image: FROM scratch + static catatonit
#   bash hack/images.sh coredns        only the cluster DNS image: FROM scratch + hack/tools.sh's CoreDNS
#   bash hack/images.sh redis          only the Redis image: FROM scratch + Debian's redis-server
#   bash hack/images.sh wheelhouse     only the host-side wheelhouse (wheelhouse/*.whl)
#   bash hack/images.sh export DIR     build if needed, then write DIR/{worker,operator,pause,coredns,redis,gateway}.tar as
#                                      docker archives named docker.io/<IMAGE_REPO>/<name>:<VERSION>,
#                                      ready for `ctr -n k8s.io images import DIR/worker.tar`
#   bash hack/images.sh names          print the six image references (as the kubelet names them)
#   bash hack/images.sh push           push the built worker, operator and gateway images to the registry
#                                      IMAGE_REPO names (log in with the engine first; docs/release.md)
#
# Environment: IMAGE_REPO (streamqueue), VERSION (the VERSION file), ENGINE (docker|podman|buildah;
# default: docker if its daemon answers, else podman, else buildah, installed from Debian if none),
# PYTHON_IMAGE (the base; default: see choose_base), BASE (auto|offline|local|pull), WHEELHOUSE (1: install
# Python packages from a wheelhouse the host's pip fills, so builds need no network inside the
# container; 0: pip inside the build uses the index), REBUILD (1: ignore the caches).
#
# Caches: the base image is rebuilt only when its recipe changes; an app image only when the hash of
# its inputs (Dockerfile, copied sources, pins, wheelhouse, base image id) differs from the
# `io.streamqueue.inputs` label of the existing image; an export only when the image id changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

IMAGE_REPO="${IMAGE_REPO:-streamqueue}"
VERSION="${VERSION:-$(cat VERSION)}"
BASE="${BASE:-auto}"
WHEELHOUSE="${WHEELHOUSE:-1}"
REBUILD="${REBUILD:-0}"
DEFAULT_PYTHON_IMAGE="python:3.11-slim-bookworm"   # the Dockerfiles' default
LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-localhost/streamqueue-python:3.11-bookworm}"
BASE_SUITE="bookworm"          # Python 3.11, glibc 2.36: the same as the default base
PY_TAG="311"                   # CPython ABI of the base: the wheelhouse is fetched for it
SETUPTOOLS_REQ="setuptools>=69,<81"  # the build backend the packages declare, for offline builds
EXTRA_WHEELS="async-timeout>=4.0.3"  # redis needs it on Python < 3.11.3 (Debian bookworm has 3.11.2)
CACHE="${STREAMQUEUE_IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamqueue-images}"
LABEL="io.streamqueue.inputs"
mkdir -p "$CACHE"

worker_image() { echo "$IMAGE_REPO/worker:$VERSION"; }
operator_image() { echo "$IMAGE_REPO/operator:$VERSION"; }
pause_image() { echo "$IMAGE_REPO/pause:$VERSION"; }
coredns_image() { echo "$IMAGE_REPO/coredns:$VERSION"; }
redis_image() { echo "$IMAGE_REPO/redis:$VERSION"; }
gateway_image() { echo "$IMAGE_REPO/gateway:$VERSION"; }

# The name the kubelet asks containerd for: `streamqueue/worker:0.1.0` is normalised to
# `docker.io/streamqueue/worker:0.1.0`; a reference whose first component is a host stays as is.
qualified() {
  local ref="$1" first="${1%%/*}"
  if [[ "$ref" != */* ]]; then echo "docker.io/library/$ref"
  elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then echo "$ref"
  else echo "docker.io/$ref"; fi
}

# One build at a time per cache (two `make images` on one machine would race on the same tags).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "waiting for another image build to finish"
  flock 9
fi

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "need the Debian packages ${missing[*]} (no apt-get here)"
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- engine -----------------------------------------------------------------------------------------
pick_engine() {
  if [ -n "${ENGINE:-}" ]; then :
  elif command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then ENGINE=podman
  elif command -v buildah >/dev/null 2>&1; then ENGINE=buildah
  else apt_install buildah; ENGINE=buildah
  fi
  case "$ENGINE" in docker|podman|buildah) ;; *) die "ENGINE must be docker, podman or buildah, not $ENGINE";; esac
  command -v "$ENGINE" >/dev/null 2>&1 || die "$ENGINE is not installed"
}

image_exists() {
  case "$ENGINE" in
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    *) "$ENGINE" image inspect "$1" >/dev/null 2>&1 ;;
  esac
}

image_id() {
  case "$ENGINE" in
    buildah) buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null ;;
    *) "$ENGINE" image inspect --format '{{.Id}}' "$1" 2>/dev/null ;;
  esac
}

image_label() {  # image label-name
  case "$ENGINE" in
    buildah) buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null ;;
    *) "$ENGINE" image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null ;;
  esac
}

image_size() {  # bytes, as the engine reports it
  case "$ENGINE" in
    buildah) buildah images --format '{{.Size}}' "$1" 2>/dev/null | head -1 ;;
    *) "$ENGINE" image inspect --format '{{.Size}}' "$1" 2>/dev/null ;;
  esac
}

build_image() {  # tag dockerfile context [extra build flags...]
  local tag="$1" file="$2" context="$3"; shift 3
  case "$ENGINE" in
    docker) DOCKER_BUILDKIT=1 docker build --file "$file" --tag "$tag" "$@" "$context" ;;
    # --layers keeps the build stage's layers, so an edit to worker/ reuses the venv + wheel steps.
    podman) podman build --layers --file "$file" --tag "$tag" "$@" "$context" ;;
    buildah) buildah bud --layers --file "$file" --tag "$tag" "$@" "$context" ;;
  esac
}

# Was `tag` built from exactly these inputs? (the hash is stored as a label on the image)
up_to_date() {
  [ "$REBUILD" = 1 ] && return 1
  image_exists "$1" && [ "$(image_label "$1" "$LABEL")" = "$2" ]
}

# --- base image -------------------------------------------------------------------------------------
# A bookworm root filesystem with Debian's Python 3.11, made by mmdebstrap from the Debian archive
# (reachable through apt when no container registry is). No docs, man pages, locales or apt lists;
# merged /usr without the usrmerge package (which would pull in perl: ~50 MB).
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates"
mmdebstrap_args() {
  # shellcheck disable=SC2016  # "$1" in the hook is its argument (the new root), expanded by mmdebstrap
  printf '%s\n' --variant=minbase --include="$BASE_PACKAGES" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --skip=output/dev \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/log/*.log "$1"/var/log/apt/*'
}
base_containerfile() {
  cat <<'EOF'
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
EOF
}

build_base() {
  local recipe; recipe="$( (echo "$BASE_SUITE"; mmdebstrap_args; base_containerfile) | sha256sum | cut -c1-16)"
  if up_to_date "$LOCAL_BASE_IMAGE" "$recipe"; then
    log "base image $LOCAL_BASE_IMAGE is up to date"
    return
  fi
  apt_install mmdebstrap
  local dir; dir="$(mktemp -d "$CACHE/base.XXXXXX")"
  local args=(); mapfile -t args < <(mmdebstrap_args)
  log "building the base root filesystem: Debian $BASE_SUITE + $BASE_PACKAGES (mmdebstrap, about a minute)"
  local start=$SECONDS
  if ! mmdebstrap --quiet "${args[@]}" "$BASE_SUITE" "$dir/rootfs.tar" ${BASE_MIRROR:+"$BASE_MIRROR"} >&2; then
    rm -rf "$dir"; die "mmdebstrap failed"
  fi
  base_containerfile > "$dir/Containerfile"
  build_image "$LOCAL_BASE_IMAGE" "$dir/Containerfile" "$dir" --label "$LABEL=$recipe" \
    --label "org.opencontainers.image.description=Debian $BASE_SUITE with Python 3 (mmdebstrap)" >&2
  rm -rf "$dir"
  log "base image $LOCAL_BASE_IMAGE built in $((SECONDS - start))s"
}

# The base the app images build FROM: PYTHON_IMAGE if set; else the Dockerfiles' default when it is
# here or can be pulled (BASE=pull forces it); else the local Debian base (BASE=local forces it).
# BASE=auto prefers a local base already built over a pull, so offline machines never try a registry
# once `make base-image` has run; BASE=offline never tries one (the default image if it is here,
# else the local base).
choose_base() {
  case "$BASE" in auto|offline|local|pull) ;; *) die "BASE must be auto, offline, local or pull, not $BASE";; esac
  if [ -n "${PYTHON_IMAGE:-}" ]; then return; fi
  if [ "$BASE" != local ] && image_exists "$DEFAULT_PYTHON_IMAGE"; then
    PYTHON_IMAGE="$DEFAULT_PYTHON_IMAGE"; return
  fi
  if [ "$BASE" = auto ] && image_exists "$LOCAL_BASE_IMAGE"; then
    build_base; PYTHON_IMAGE="$LOCAL_BASE_IMAGE"; return
  fi
  if [ "$BASE" = auto ] || [ "$BASE" = pull ]; then
    log "pulling $DEFAULT_PYTHON_IMAGE"
    if timeout 300 "$ENGINE" pull "$DEFAULT_PYTHON_IMAGE" >&2; then
      PYTHON_IMAGE="$DEFAULT_PYTHON_IMAGE"; return
    fi
    [ "$BASE" = pull ] && die "cannot pull $DEFAULT_PYTHON_IMAGE"
    log "cannot pull $DEFAULT_PYTHON_IMAGE: building the base from Debian packages instead"
  fi
  build_base
  PYTHON_IMAGE="$LOCAL_BASE_IMAGE"
}

# --- wheelhouse -------------------------------------------------------------------------------------
# Wheels for every runtime dependency of worker/, operator/ and gateway/ (pinned by requirements-dev.txt) plus
# the setuptools the packages build with, fetched by the host's pip for CPython 3.11 manylinux, so
# `pip install --no-index --find-links /src/wheelhouse` inside the build needs no network.
host_pip() {
  if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    PIP=(.venv/bin/python -m pip); return
  fi
  local venv="$CACHE/pip-venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
  PIP=("$venv/bin/python" -m pip)
}

runtime_requirements() {  # the dependencies the three packages declare (and the extras images install), minus themselves
  python3 - <<'EOF'
import re, tomllib
own, reqs = set(), []
for folder, extras in (("worker", ["uvloop"]), ("operator", []), ("gateway", [])):
    with open(f"{folder}/pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    own.add(project["name"].lower())
    reqs += project["dependencies"]
    reqs += [r for extra in extras for r in project["optional-dependencies"][extra]]
for r in dict.fromkeys(reqs):
    if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() not in own:
        print(r)
EOF
}

build_wheelhouse() {
  local arch; arch="$(uname -m)"; [ "$arch" = arm64 ] && arch=aarch64
  local stamp_file="wheelhouse/.stamp"
  local stamp; stamp="$( (cat requirements-dev.txt worker/pyproject.toml operator/pyproject.toml gateway/pyproject.toml; \
    echo "$arch $PY_TAG $SETUPTOOLS_REQ $EXTRA_WHEELS"; declare -f build_wheelhouse runtime_requirements) | sha256sum | cut -c1-16)"
  if [ "$REBUILD" != 1 ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
    log "wheelhouse is up to date ($(find wheelhouse -name '*.whl' | wc -l) wheels)"
    return
  fi
  host_pip
  local reqs=(); mapfile -t reqs < <(runtime_requirements)
  local platforms=() minor
  for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
  platforms+=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch" --platform "manylinux1_$arch")
  log "filling wheelhouse/ with the host's pip (cp$PY_TAG, $arch)"
  find wheelhouse -name '*.whl' -delete
  # pip evaluates dependency markers against the host's interpreter, not --python-version, and some
  # depend on the base's patch release (Debian's 3.11.2): EXTRA_WHEELS adds what those markers ask for.
  "${PIP[@]}" download --quiet --disable-pip-version-check --dest wheelhouse \
    --only-binary=:all: --implementation cp --python-version "3.${PY_TAG#3}" --abi "cp$PY_TAG" \
    "${platforms[@]}" --constraint requirements-dev.txt "${reqs[@]}" "$SETUPTOOLS_REQ" $EXTRA_WHEELS >&2
  echo "$stamp" > "$stamp_file"
  log "wheelhouse: $(find wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
}

# --- app images -------------------------------------------------------------------------------------
# Everything a Dockerfile's build reads: the Dockerfile, what it COPYs (as .dockerignore filters it),
# the base image and the build arguments.
inputs_hash() {  # dockerfile
  local file="$1" sources
  sources="$(awk 'toupper($1) == "COPY" && $2 !~ /^--from/ { for (i = 2; i < NF; i++) print $i }' "$file")"
  {
    echo "$PYTHON_IMAGE $(image_id "$PYTHON_IMAGE") wheels-only=$WHEELHOUSE $VERSION"
    declare -f build_app
    cat "$file"
    # shellcheck disable=SC2086
    find $sources -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -path '*/.*_cache/*' \
      ! -path '*/.hypothesis/*' ! -name .stamp -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

build_app() {  # name dockerfile description
  local name="$1" file="$2" description="$3" tag hash
  tag="$IMAGE_REPO/$name:$VERSION"
  hash="$(inputs_hash "$file")"
  if up_to_date "$tag" "$hash"; then
    log "$tag is up to date"
    return
  fi
  log "building $tag ($ENGINE, FROM $PYTHON_IMAGE)"
  local start=$SECONDS old; old="$(image_id "$tag" || true)"
  build_image "$tag" "$file" . \
    --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "WHEELS_ONLY=$WHEELHOUSE" \
    --label "$LABEL=$hash" \
    --label "org.opencontainers.image.title=streamqueue-$name" \
    --label "org.opencontainers.image.description=$description" \
    --label "org.opencontainers.image.version=$VERSION" \
    --label "org.opencontainers.image.base.name=$PYTHON_IMAGE" >&2
  log "$tag built in $((SECONDS - start))s, $(human "$(image_size "$tag")")"
  drop_replaced "$tag" "$old"
}

# The image a rebuild replaced is left untagged: remove it (quietly: it may still be in use).
drop_replaced() {  # tag old-id
  if [ -n "$2" ] && [ "$2" != "$(image_id "$1")" ]; then "$ENGINE" rmi "$2" >/dev/null 2>&1 || true; fi
}

human() {  # bytes -> 185MB; buildah already reports "184 MB"
  if [[ "${1:-}" =~ ^[0-9]+$ ]]; then numfmt --to=si --suffix=B "$1"; else echo "${1:-?}"; fi
}

build_gateway() {
  build_app gateway Dockerfile.gateway "streamqueue gateway: an OpenAI-compatible HTTP front door to the queues"
}

# --- pause image ------------------------------------------------------------------------------------
# containerd needs a sandbox image for every pod and cannot pull registry.k8s.io/pause here. The
# pause role is: be PID 1 of the pod, reap zombies, sleep until killed. `catatonit -P` does exactly
# that; Debian's catatonit is statically linked, so the image is that one file FROM scratch (~1 MB).
build_pause() {
  local bin="${CATATONIT:-/usr/bin/catatonit}"
  [ -x "$bin" ] || { apt_install catatonit; bin=/usr/bin/catatonit; }
  if ldd "$bin" >/dev/null 2>&1; then die "$bin is dynamically linked: a FROM scratch image needs a static one"; fi
  local dir; dir="$(mktemp -d "$CACHE/pause.XXXXXX")"
  cp "$bin" "$dir/catatonit"
  cat > "$dir/Containerfile" <<'EOF'
FROM scratch
COPY catatonit /catatonit
USER 65535:65535
ENTRYPOINT ["/catatonit", "-P"]
EOF
  build_context_image "$(pause_image)" "$dir" streamqueue-pause "pod sandbox: catatonit -P as PID 1"
}

# --- coredns image ----------------------------------------------------------------------------------
# The node's cluster DNS (docs/node.md). hack/tools.sh builds a static CoreDNS with only the plugins
# cluster DNS uses; the image is that one file FROM scratch, as CoreDNS's own image is.
build_coredns() {
  local bin="$ROOT/.tools/bin/coredns"
  [ -x "$bin" ] || bash "$ROOT/hack/tools.sh" coredns
  local dir; dir="$(mktemp -d "$CACHE/coredns.XXXXXX")"
  cp -L "$bin" "$dir/coredns"
  cat > "$dir/Containerfile" <<'EOF'
FROM scratch
COPY coredns /coredns
USER 65532:65532
ENTRYPOINT ["/coredns"]
EOF
  build_context_image "$(coredns_image)" "$dir" streamqueue-coredns "cluster DNS: CoreDNS with the kubernetes plugin"
}

# --- redis image ------------------------------------------------------------------------------------
# The Redis the node's queue uses, run as users run it (a StatefulSet). No registry serves redis:7
# here, so: Debian's redis-server (the package the tests' own Redis comes from) and exactly the shared
# libraries it loads, at their paths, FROM scratch. No shell, no redis-cli; runs as uid 999.
build_redis() {
  [ -x /usr/bin/redis-server ] || apt_install redis-server
  local bin lib; bin="$(readlink -f /usr/bin/redis-server)"
  local dir; dir="$(mktemp -d "$CACHE/redis.XXXXXX")"
  mkdir -p "$dir/root/usr/bin" "$dir/root/data"
  cp "$bin" "$dir/root/usr/bin/redis-server"  # by this name: the binary picks its mode from argv[0]
  for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$dir/root$(dirname "$lib")"
    cp -L "$lib" "$dir/root$lib"
  done
  cat > "$dir/Containerfile" <<'EOF'
FROM scratch
COPY root/ /
USER 999:999
WORKDIR /data
ENTRYPOINT ["/usr/bin/redis-server"]
EOF
  build_context_image "$(redis_image)" "$dir" streamqueue-redis \
    "Debian's $(dpkg-query -W -f '${Package} ${Version}' redis-server) and its libraries"
}

# An image whose whole build context is `dir` (a Containerfile and what it copies), which is removed
# afterwards: rebuilt only when a file in it, the version or this recipe changes.
build_context_image() {  # tag dir title description
  local tag="$1" dir="$2" title="$3" description="$4" hash
  hash="$( (cd "$dir" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; \
    echo "$VERSION"; declare -f build_context_image) | sha256sum | cut -c1-16)"
  if up_to_date "$tag" "$hash"; then
    log "$tag is up to date"
  else
    log "building $tag ($description)"
    build_image "$tag" "$dir/Containerfile" "$dir" --label "$LABEL=$hash" \
      --label "org.opencontainers.image.title=$title" \
      --label "org.opencontainers.image.description=$description" \
      --label "org.opencontainers.image.version=$VERSION" >&2
  fi
  rm -rf "$dir"
}

build_all() {
  local start=$SECONDS
  pick_engine
  choose_base
  if [ "$WHEELHOUSE" = 1 ]; then build_wheelhouse; fi
  build_app worker Dockerfile.worker "streamqueue worker: the Redis Streams consumer-group loop"
  build_app operator Dockerfile.operator "streamqueue operator: scales workers on the Redis backlog"
  build_gateway
  build_pause
  build_coredns
  build_redis
  log "images ready in $((SECONDS - start))s: $(worker_image) $(operator_image) $(pause_image) $(coredns_image) $(redis_image) $(gateway_image)"
}

# --- export -----------------------------------------------------------------------------------------
export_one() {  # image dir name
  local image="$1" out="$2/$3.tar" ref id
  ref="$(qualified "$image")"
  id="$(image_id "$image")"
  if [ "$REBUILD" != 1 ] && [ -f "$out" ] && [ "$(cat "$out.id" 2>/dev/null)" = "$id $ref" ]; then
    log "$out is up to date ($ref)"
    return
  fi
  rm -f "$out" "$out.id" "$out.tmp"
  case "$ENGINE" in
    docker)
      docker tag "$image" "$ref"
      docker save --output "$out.tmp" "$ref" ;;
    *)
      if command -v buildah >/dev/null 2>&1; then
        buildah push --quiet "$image" "docker-archive:$out.tmp:$ref" >/dev/null
      else
        podman tag "$image" "$ref"
        podman save --quiet --format docker-archive --output "$out.tmp" "$ref"
      fi ;;
  esac
  mv "$out.tmp" "$out"
  echo "$id $ref" > "$out.id"
  log "wrote $out ($ref, $(human "$(stat -c %s "$out")"))"
}

export_all() {
  local dir="${1:?usage: hack/images.sh export DIR}"
  mkdir -p "$dir"
  build_all
  export_one "$(worker_image)" "$dir" worker
  export_one "$(operator_image)" "$dir" operator
  export_one "$(pause_image)" "$dir" pause
  export_one "$(coredns_image)" "$dir" coredns
  export_one "$(redis_image)" "$dir" redis
  export_one "$(gateway_image)" "$dir" gateway
  log "import with: ctr -n k8s.io images import $dir/<name>.tar  (worker, operator, pause, coredns, redis, gateway)"
}

# --- push -------------------------------------------------------------------------------------------
# What `make images` built, to the registry IMAGE_REPO names: this machine's architecture only (the
# release workflow publishes multi-arch images). The pause image stays here: clusters have their own.
push_one() {  # image
  local image="$1"
  image_exists "$image" || die "$image is not built: run make images IMAGE_REPO=$IMAGE_REPO first"
  log "pushing $image ($ENGINE)"
  case "$ENGINE" in
    docker) docker push "$image" >&2 ;;
    # podman and buildah store `team/worker` as localhost/team/worker: name the destination.
    *) "$ENGINE" push "$image" "docker://$(qualified "$image")" >&2 ;;
  esac
}

push_all() {
  pick_engine
  push_one "$(worker_image)"
  push_one "$(operator_image)"
  push_one "$(gateway_image)"
  log "pushed; install with --set image.repository=$IMAGE_REPO/operator --set workerImage.repository=$IMAGE_REPO/worker --set gateway.image.repository=$IMAGE_REPO/gateway"
}

case "${1:-build}" in
  build) build_all ;;
  base-image) pick_engine; build_base ;;
  gateway) pick_engine; choose_base; if [ "$WHEELHOUSE" = 1 ]; then build_wheelhouse; fi; build_gateway ;;
  pause) pick_engine; build_pause ;;
  coredns) pick_engine; build_coredns ;;
  redis) pick_engine; build_redis ;;
  wheelhouse) build_wheelhouse ;;
  export) shift; export_all "$@" ;;
  push) push_all ;;
  names) for i in "$(worker_image)" "$(operator_image)" "$(pause_image)" "$(coredns_image)" "$(redis_image)" "$(gateway_image)"; do qualified "$i"; done ;;
  *) die "unknown command $1 (build, base-image, gateway, pause, coredns, redis, wheelhouse, export DIR, names, push)" ;;
esac
