#!/usr/bin/env bash
# Build adaptflow's image from infra/Dockerfile with the repo root as context.
# Uses `docker build` when a docker daemon answers (`docker info`), else `buildah bud --isolation chroot`.
#
#   infra/build-image.sh [-t TAG] [-b BASE_IMAGE] [-c GIT_COMMIT] [-- EXTRA BUILD ARGS...]
#
#   -t TAG          image tag (default: $IMAGE or adaptflow:dev)
#   -b BASE_IMAGE   override the Dockerfile's digest-pinned base (default: $BASE_IMAGE or the Dockerfile's)
#   -c GIT_COMMIT   commit baked in as ADAPTFLOW_GIT_COMMIT (default: $GIT_COMMIT or `git rev-parse HEAD`,
#                   with a -dirty suffix when the tree has uncommitted changes)
#   BUILDER=docker|buildah forces a builder. Anything after `--` goes to the builder as is.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${IMAGE:-adaptflow:dev}"
base="${BASE_IMAGE:-}"
commit="${GIT_COMMIT:-}"

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while getopts ":t:b:c:h" opt; do
    case "$opt" in
        t) tag="$OPTARG" ;;
        b) base="$OPTARG" ;;
        c) commit="$OPTARG" ;;
        h) usage; exit 0 ;;
        :) echo "build-image: -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
        *) echo "build-image: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift

if [[ -z "$commit" ]] && git -C "$root" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    commit="$(git -C "$root" rev-parse HEAD)"
    if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        commit="${commit}-dirty"
    fi
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -n1)"
args=(
    -f "$root/infra/Dockerfile"
    -t "$tag"
    --build-arg "ADAPTFLOW_GIT_COMMIT=${commit}"
    --build-arg "ADAPTFLOW_VERSION=${version:-0.0.0}"
    --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
)
[[ -n "$base" ]] && args+=(--build-arg "BASE_IMAGE=${base}")

builder="${BUILDER:-}"
if [[ -z "$builder" ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        builder=docker
    elif command -v buildah >/dev/null 2>&1; then
        builder=buildah
    else
        echo "build-image: no docker daemon answers and buildah is not installed" \
            "(Debian/Ubuntu: apt-get install buildah)" >&2
        exit 1
    fi
fi

echo "build-image: ${builder} -> ${tag} (commit ${commit:-unknown}${base:+, base $base})" >&2
case "$builder" in
    docker) exec docker build "${args[@]}" "$@" "$root" ;;
    buildah) exec buildah bud --isolation chroot "${args[@]}" "$@" "$root" ;;
    *) echo "build-image: BUILDER must be docker or buildah, not '$builder'" >&2; exit 2 ;;
esac
