# Aeterna's container image: Aeterna is the ENTRYPOINT, so it runs as the container's PID 1, and the demo app
# (examples/llm-agent, an "LLM agent" whose chat sessions survive a reload through the state relay) is the
# service it supervises.
#
#   docker build -t aeterna-demo:0.1.0 .
#   docker run -d --name aeterna-demo -p 8080:8080 -p 9091:9091 --stop-timeout 15 aeterna-demo:0.1.0
#   curl -s -X POST http://127.0.0.1:8080/sessions     # then POST /sessions/<id>/messages, GET /sessions/<id>
#   docker exec aeterna-demo aeterna reload      # 0 promoted, 1 rolled back or failed, 3 no daemon, 4 busy
#
# Your own app: build FROM this image (or copy /opt/aeterna out of it) and mount your aeterna.yaml at
# /etc/aeterna/aeterna.yaml. docs/operations.md has the details; deploy/kubernetes/ runs this image on Kubernetes.
#
# Builds alike with BuildKit (docker build) and with buildah / podman build (no heredocs, no RUN --mount, no
# syntax directive). Aeterna without Node, as one file to copy into any image: docs/operations.md, "Adding
# Aeterna to any image", and examples/*/Dockerfile.
#
# Users: Aeterna itself runs as root, because it switches the app to service.user ("node" here, the
# unprivileged user of the Node images) and must be able to signal it. To run everything unprivileged instead,
# run with --user node (or add `USER node`) and drop service.user and service.group from the config.

ARG NODE_VERSION=20

# ---- build: the toolchain (python3, make, g++ come with the full Debian image) -------------------------------
FROM node:${NODE_VERSION}-bookworm AS build
WORKDIR /opt/aeterna
# Dependencies first, cached while the lockfile does not change. --ignore-scripts: the addon and the TypeScript
# are built below, once their sources are here.
COPY package.json package-lock.json LICENSE ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json binding.gyp ./
COPY native/ native/
COPY src/ src/
COPY bin/ bin/
COPY configs/ configs/
COPY examples/llm-agent/ examples/llm-agent/
# The TypeScript, then the addon as a prebuilt binary (prebuilds/linux-x64/aeterna.glibc.node, the same one the
# npm tarball ships), then only the runtime dependencies and files are kept.
RUN npx tsc -p tsconfig.json \
 && npm run build:prebuilds \
 && npm prune --omit=dev --no-audit --no-fund \
 && rm -rf build native src tsconfig.json binding.gyp \
 && find dist -name '*.map' -delete \
 && PREBUILDS_ONLY=1 node -e "require('node-gyp-build')('/opt/aeterna')"

# ---- runtime: slim, no compiler, no python3 ------------------------------------------------------------------
FROM node:${NODE_VERSION}-bookworm-slim
LABEL org.opencontainers.image.title="aeterna-demo" \
      org.opencontainers.image.description="Aeterna (PID 1) supervising its demo app" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV NODE_ENV=production \
    AETERNA_CONFIG=/etc/aeterna/aeterna.yaml
COPY --from=build /opt/aeterna /opt/aeterna
# `aeterna` on PATH for `docker exec <container> aeterna reload`; /run/aeterna holds the control socket and the
# state relay's (owned by node, so that the image also runs with --user node).
RUN ln -s /opt/aeterna/bin/aeterna.js /usr/local/bin/aeterna \
 && mkdir -p /run/aeterna /etc/aeterna \
 && chown node:node /run/aeterna

# The demo config (examples/llm-agent/aeterna.image.yaml). Mount your own over it
# (docker run -v ./aeterna.yaml:/etc/aeterna/aeterna.yaml:ro ...).
COPY examples/llm-agent/aeterna.image.yaml /etc/aeterna/aeterna.yaml

# Check at build time that the CLI runs here (addon loaded from the prebuild) and the config is valid.
RUN aeterna --version && aeterna validate

EXPOSE 8080 9091
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["node", "-e", "require('http').get('http://127.0.0.1:9091/readyz', (r) => process.exit(r.statusCode === 200 ? 0 : 1)).on('error', () => process.exit(1))"]
# Exec form: Aeterna is PID 1 itself (no shell in between), gets SIGTERM from `docker stop` and reaps zombies.
ENTRYPOINT ["node", "/opt/aeterna/bin/aeterna.js", "start", "-c", "/etc/aeterna/aeterna.yaml"]
