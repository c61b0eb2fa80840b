# genesis-consume in a container (docs/deploy.md). Two targets:
#
#   consumer (the default, the last stage): runs as the unprivileged user `genesis` (uid 10001).
#     Rule updates, LLM configurations and static code analysis (quality, linting, security) work;
#     `testing` requests and experiments fail with `sandbox_unavailable`, because the sandbox needs
#     root (or user namespaces) and bubblewrap, and this image has neither.
#   sandbox: the same plus bubblewrap and pytest for Debian's python3, running as root so that every
#     sandboxed run gets an unprivileged uid of its own. It needs a container allowed to make
#     namespaces and mounts (privileged, or CAP_SYS_ADMIN with AppArmor unconfined): see
#     docs/deploy.md. Without that it still starts, and `testing` fails with `sandbox_unavailable`.
#
#   docker build -t genesis-pgflow .
#   docker build --target sandbox -t genesis-pgflow:sandbox .
#   docker build --build-arg TOOLCHAINS= -t genesis-pgflow:slim .   # no Node.js/Elixir analysis
#
# Debian 12 because its python3 (3.11) is one the package supports (Debian 13's 3.13 is outside
# requires-python), the sandbox runs Debian's /usr/bin/python3, and the test suite runs on it.
ARG DEBIAN=debian:bookworm-slim

# --- the wheel -----------------------------------------------------------------------------------
FROM ${DEBIAN} AS wheel
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY genesis_pgflow ./genesis_pgflow
RUN python3 -m venv /build \
    && /build/bin/pip install --no-cache-dir --quiet --upgrade pip \
    && /build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- Biome and TypeScript, the npm tools of the JavaScript/TypeScript analysers ------------------
# (the same pins as scripts/system-deps.sh; npm itself stays out of the final image)
FROM ${DEBIAN} AS npm-tools
ARG BIOME_VERSION=2.3.8
ARG TYPESCRIPT_VERSION=5.9.3
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates nodejs npm \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /opt/genesis/tools \
    && echo '{"private": true}' >/opt/genesis/tools/package.json \
    && npm install --prefix /opt/genesis/tools --no-audit --no-fund --loglevel=error --save-exact \
        "@biomejs/biome@${BIOME_VERSION}" "typescript@${TYPESCRIPT_VERSION}"

# --- what both targets share ----------------------------------------------------------------------
FROM ${DEBIAN} AS base
# nodejs: JavaScript/TypeScript analysis; elixir: Elixir analysis. Leave them out with
# --build-arg TOOLCHAINS= and those languages are reported unsupported (the rest works).
ARG TOOLCHAINS="nodejs elixir"
# tini is PID 1: it forwards SIGTERM to genesis-consume and reaps the orphans of killed tools
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini git ca-certificates ${TOOLCHAINS} \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /dist/ /tmp/dist/
# the image gets the versions the tests ran with: requirements-dev.lock as constraints
COPY requirements-dev.lock /tmp/dist/
RUN python3 -m venv /opt/genesis/venv \
    && /opt/genesis/venv/bin/pip install --no-cache-dir --quiet -c /tmp/dist/requirements-dev.lock /tmp/dist/*.whl \
    && rm -rf /tmp/dist
COPY --from=npm-tools /opt/genesis/tools /opt/genesis/tools
# the analysers look for the npm tools in <site-packages>/.tools
RUN ln -s /opt/genesis/tools "$(/opt/genesis/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/.tools"
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/genesis --shell /usr/sbin/nologin genesis \
    && install -d -o 10001 -g 10001 -m 0755 /var/lib/genesis
# GENESIS_HOME must be traversable by the sandbox's uids (0755); no DSN here: give
# GENESIS_DATABASE_URL at run time (without one the consumer would start an embedded database).
# The metrics port serves /metrics, /healthz and /readyz; 0.0.0.0 so that probes reach it.
ENV PATH=/opt/genesis/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    GENESIS_HOME=/var/lib/genesis \
    GENESIS_METRICS_HOST=0.0.0.0 \
    GENESIS_METRICS_PORT=9464 \
    GENESIS_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/genesis
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD /opt/genesis/venv/bin/python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GENESIS_METRICS_PORT', '9464'), timeout=4)"
# SIGTERM: stop reading, finish in-flight work for up to GENESIS_SHUTDOWN_GRACE_S (30), give back
# the rest, exit 0. Give the container more than that before SIGKILL (docker stop -t 45).
STOPSIGNAL SIGTERM

# --- the sandbox variant: testing requests and experiments -----------------------------------------
FROM base AS sandbox
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap libseccomp2 python3-pytest \
    && rm -rf /var/lib/apt/lists/*
# root inside the container: bwrap then needs no user namespace, and setpriv hands each run an
# unprivileged uid of its own (1900000000-1900000255), with no capabilities and no new privileges
USER 0:0
ENTRYPOINT ["/usr/bin/tini", "--", "genesis-consume"]
CMD []

# --- the default: a non-root consumer ---------------------------------------------------------------
FROM base AS consumer
USER 10001:10001
ENTRYPOINT ["/usr/bin/tini", "--", "genesis-consume"]
CMD []
