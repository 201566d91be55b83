# syntax=docker/dockerfile:1
# FerryMQ container: build with dev dependencies, ship only production ones, run as non-root.
ARG NODE_IMAGE=node:24-bookworm-slim

FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
COPY src ./src
# `npm ci` runs the "prepare" script, which compiles src/ to dist/.
RUN npm ci --no-audit --no-fund \
 && npm prune --omit=dev --no-audit --no-fund

FROM ${NODE_IMAGE}
ENV NODE_ENV=production \
    FERRYMQ_DATA_DIR=/data
WORKDIR /app
COPY --from=build --chown=root:root /app/package.json ./
COPY --from=build --chown=root:root /app/node_modules ./node_modules
COPY --from=build --chown=root:root /app/dist ./dist
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
# MQTT, MQTT over WebSocket, MQTT over TLS, secure WebSocket, HTTP (health, metrics).
# The HTTP listener binds 127.0.0.1 by default: set listeners.http.host to 0.0.0.0 to scrape
# /metrics from outside the container. The health check below runs inside it.
EXPOSE 1883 8083 8883 8084 18083
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:18083/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# SIGTERM (docker stop) shuts down cleanly: stop accepting, close clients, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["node", "dist/cli.js"]
