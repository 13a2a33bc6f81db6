# The agent's container image: `probe run` on /etc/probe/agent.yaml, as a non-root user,
# on a read-only root filesystem with one writable volume (/var/lib/probe: the archive).
# Deployment guide: docs/deploy.md.  Build:
#   docker build -t probe .                       (base: the official Python slim image)
#   buildah bud --build-arg BASE_IMAGE=localhost/debian-python3 ...   (a local base: CI;
#   offline with WHEELS, below)
# Any base with python3 >= 3.11 and the venv module works; both stages use the same one.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Offline builds (the test suite, tests/containers.py): bind-mount a directory holding the
# locks' wheels (scripts/container-wheels) and name it here, e.g.
#   buildah bud --network none --volume DIR:/wheels:ro --build-arg WHEELS=/wheels ...
# pip then installs from that directory alone.  Empty (the default): from PyPI.
ARG WHEELS=""
WORKDIR /src
# Dependencies first (their layer survives code changes), pinned with hashes, wheels only:
# nothing is compiled and nothing unpinned can slip in.  /opt/build holds pip and the
# hash-pinned build backend (requirements/build.lock); /opt/probe, the runtime venv that
# the image ships, never gets pip at all (pip --python installs into it from outside).
COPY requirements/ requirements/
RUN if [ -n "$WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"; fi \
 && python3 -m venv /opt/build \
 && python3 -m venv --without-pip /opt/probe \
 && export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
 && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements/build.lock \
 && /opt/build/bin/pip --python /opt/probe/bin/python install --require-hashes \
      --only-binary=:all: -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY seeds/ seeds/
COPY configs/agent.yaml configs/agent-container.yaml configs/
COPY probe/ probe/
RUN export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
 && /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/build/bin/pip --python /opt/probe/bin/python install --no-deps /tmp/wheels/*.whl \
 && /opt/probe/bin/probe check-config configs/agent-container.yaml

FROM ${BASE_IMAGE}
# A fixed numeric id, so volume ownership and `USER` agree on every host.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/probe --no-create-home \
      --shell /usr/sbin/nologin probe \
 && install -d -o probe -g probe -m 0750 /var/lib/probe /var/lib/probe/archive
COPY --from=build /opt/probe /opt/probe
COPY configs/agent-container.yaml /etc/probe/agent.yaml
ENV PATH=/opt/probe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/probe
VOLUME ["/var/lib/probe"]
# /metrics, /healthz and the status page; the config listens on 0.0.0.0:9464 inside the
# container's own network namespace: publish or scrape it from the container network.
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
ENTRYPOINT ["probe"]
CMD ["run", "-c", "/etc/probe/agent.yaml"]
