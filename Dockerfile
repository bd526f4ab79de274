# syntax=docker/dockerfile:1
# The fhir-sidecar image: what the Helm chart (helm/fhir-sidecar) runs by default
# (image.repository fhir-sidecar, tag = the chart's appVersion = the package version).
# Build it in your CI; no container engine runs on the project's development machines:
#
#   docker build -t REGISTRY/fhir-sidecar:0.1.0 .
#
# Pin the base by digest in CI (docker buildx imagetools inspect python:3.11.13-slim-bookworm),
# e.g. --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>.
# One image serves the sidecar and its init containers: `interception` (iptables, sidecar mode)
# and `ca-setup` (the sidecar CA and the app's combined bundle).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: a virtualenv with the package and its dependencies (wheels; no compiler here) ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --prefer-binary . \
 && /opt/venv/bin/pip uninstall -y pip \
 && /opt/venv/bin/python -m compileall -q /opt/venv

# ---- runtime: non-root, read-only root filesystem friendly, no compilers ----
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fhir-sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# iptables: the interception init container (iptables-nft needs NET_ADMIN, -legacy also NET_RAW).
# ca-certificates: the system roots of the app's combined CA bundle.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python -m pip uninstall -y pip setuptools wheel \
 && groupadd --system --gid 10001 fhir-sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fhir-sidecar
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["fhir-sidecar"]
CMD ["run", "--config", "/etc/fhir-sidecar/config/config.yaml"]
