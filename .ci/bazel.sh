#!/usr/bin/env bash
# Bazel check for tf_lion: lint the Bazel files with buildifier, then build
# everything and run the fast test target with Debian's bazel-bootstrap 4.2.3,
# fully offline.
#
# Usage (from anywhere; normally called by .ci/run):
#   bash .ci/bazel.sh /path/to/venv/bin/python
#
# Missing tools are installed (apt: bazel-bootstrap, bazel-rules-java; npm:
# @bazel/buildifier). If a registry is unreachable, that part is skipped with
# a clear message; every other failure (install error, lint, build, test)
# makes the script exit non-zero.
#
# The venv interpreter reaches Bazel as --repo_env=TF_LION_PYTHON=<path>;
# third_party/bazel/python_venv.bzl turns it into the Python toolchain, so
# nothing is written into the source tree.
#
# Environment overrides:
#   TF_LION_BAZEL_ROOT  Bazel output_user_root (default ~/.cache/tf_lion_bazel)
#   TF_LION_BAZEL_TARGETS  targets to test (default //:test_update)
set -euo pipefail

usage="usage: bash .ci/bazel.sh /path/to/venv/bin/python"
python=${1:?$usage}
# Absolute path, but keep symlinks unresolved: a venv's bin/python is a
# symlink and resolving it would bypass the venv.
case $python in
    /*) ;;
    */*) python="$PWD/$python" ;;
    *) python=$(command -v "$python") || { echo "$usage" >&2; exit 2; } ;;
esac
if [[ ! -x $python ]]; then
    echo "bazel.sh: $python is not an executable Python interpreter" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

tmpdir=$(mktemp -d)
bazel_started=
bazel_root=${TF_LION_BAZEL_ROOT:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tf_lion_bazel}
cleanup() {
    if [[ -n $bazel_started ]]; then
        # Do not leave a Bazel server running after CI.
        bazel --output_user_root="$bazel_root" shutdown >/dev/null 2>&1 || true
    fi
    rm -rf "$tmpdir"
}
trap cleanup EXIT

# Matches the error output of apt-get / npm when the network or registry
# cannot be reached (as opposed to e.g. a missing package).
network_error_re='Could not resolve|Temporary failure resolving|Failed to fetch|Could not connect|Unable to connect|Connection (refused|timed out|failed)|Network is unreachable|No route to host|ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|network request'

# run_install <log> <command...>: runs an install command, appending its
# output to <log>. Returns 0 on success and 3 if the registry was unreachable
# (a network error anywhere in <log>); exits the script on any other failure.
run_install() {
    local log=$1
    shift
    if "$@" >>"$log" 2>&1; then
        return 0
    fi
    cat "$log" >&2
    if grep -Eq "$network_error_re" "$log"; then
        return 3
    fi
    echo "bazel.sh: '$*' failed (not a network problem)" >&2
    exit 1
}

# --- Install missing tools --------------------------------------------------
apt_packages=()
if ! command -v bazel >/dev/null; then
    apt_packages+=(bazel-bootstrap)
fi
if [[ ! -f /usr/share/bazel/rules/java/WORKSPACE ]]; then
    apt_packages+=(bazel-rules-java)
fi
if ! command -v buildifier >/dev/null && ! command -v npm >/dev/null; then
    apt_packages+=(npm)
fi

have_bazel=yes
have_npm=yes
if ((${#apt_packages[@]})); then
    echo "== Installing with apt-get: ${apt_packages[*]}"
    as_root=()
    if [[ $(id -u) != 0 ]] && sudo -n true 2>/dev/null; then
        as_root=(sudo -n env DEBIAN_FRONTEND=noninteractive)
    fi
    export DEBIAN_FRONTEND=noninteractive
    rc=0
    if [[ $(id -u) != 0 && ${#as_root[@]} == 0 ]]; then
        # Like an unreachable registry: the machine cannot install them.
        echo "bazel.sh: SKIPPING: not root and no password-less sudo; could not install ${apt_packages[*]}." >&2
        rc=1
    else
        # apt-get update often exits 0 despite fetch errors, so only the install
        # decides; both share one log so that an install failure can be traced
        # back to an unreachable mirror.
        "${as_root[@]}" apt-get update >"$tmpdir/apt.log" 2>&1 || true
        run_install "$tmpdir/apt.log" \
            "${as_root[@]}" apt-get install -y --no-install-recommends "${apt_packages[@]}" || rc=$?
        if ((rc != 0)); then
            echo "bazel.sh: SKIPPING: the apt registry is unreachable; could not install ${apt_packages[*]}." >&2
        fi
    fi
    if ((rc != 0)); then
        command -v bazel >/dev/null && [[ -f /usr/share/bazel/rules/java/WORKSPACE ]] || have_bazel=
        command -v npm >/dev/null || have_npm=
    fi
fi

buildifier=$(command -v buildifier || true)
if [[ -z $buildifier && -n $have_npm ]]; then
    echo "== Installing buildifier with npm"
    rc=0
    run_install "$tmpdir/npm.log" \
        npm install --prefix "$tmpdir/npm" --no-audit --no-fund \
        --fetch-retries=1 --fetch-retry-mintimeout=5000 \
        --fetch-retry-maxtimeout=10000 @bazel/buildifier || rc=$?
    if ((rc == 0)); then
        buildifier=$tmpdir/npm/node_modules/.bin/buildifier
    else
        echo "bazel.sh: SKIPPING LINT: the npm registry is unreachable; could not install @bazel/buildifier." >&2
    fi
elif [[ -z $buildifier ]]; then
    echo "bazel.sh: SKIPPING LINT: npm could not be installed (see above)." >&2
fi

# --- Lint --------------------------------------------------------------------
if [[ -n $buildifier ]]; then
    echo "== buildifier ($("$buildifier" --version | head -n1))"
    mapfile -t bazel_files < <(
        {
            printf '%s\n' BUILD WORKSPACE
            find third_party/bazel -name BUILD -o -name BUILD.bazel \
                -o -name WORKSPACE -o -name '*.bzl'
        } | sort -u
    )
    # native-py: Bazel 4's native py_* rules are used on purpose (no
    # rules_python offline).
    "$buildifier" -mode=check -lint=warn -warnings=-native-py "${bazel_files[@]}" || {
        echo "bazel.sh: buildifier found problems; fix with:" >&2
        echo "  buildifier -lint=fix -warnings=-native-py ${bazel_files[*]}" >&2
        exit 1
    }
    echo "buildifier: OK (${#bazel_files[@]} files)"
fi

# --- Build and test ------------------------------------------------------------
if [[ -z $have_bazel ]]; then
    echo "bazel.sh: SKIPPING Bazel build/test (Bazel could not be installed, see above)." >&2
    exit 0
fi

# --symlink_prefix=/ : do not create bazel-* symlinks in the checkout.
bazel_flags=(
    --repo_env=TF_LION_PYTHON="$python"
    --symlink_prefix=/
    --curses=no
    --color=no
)
bazel_startup=(--output_user_root="$bazel_root")

echo "== bazel build //... (python: $python)"
bazel_started=yes
bazel "${bazel_startup[@]}" build "${bazel_flags[@]}" //...

read -r -a targets <<<"${TF_LION_BAZEL_TARGETS:-//:test_update}"
echo "== bazel test ${targets[*]}"
# --nocache_test_results: really run the tests, even if an earlier run with
# the same interpreter path passed (the venv's contents are not tracked).
bazel "${bazel_startup[@]}" test "${bazel_flags[@]}" \
    --test_output=errors --nocache_test_results "${targets[@]}"
