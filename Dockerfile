# CPU image of swarm-node. Real models on GPUs: see the `gpu` profile in docker-compose.yml (it swaps the torch build).
# Two stages: the build tools fastecdsa (py-libp2p) compiles with stay in the builder; the final image gets the
# virtual environment and GMP's runtime library only (gcc + libgmp-dev were 310 MB of the single-stage image).

FROM python:3.11-slim AS builder
RUN apt-get update && apt-get install -y --no-install-recommends gcc libgmp-dev && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The CPU build of torch: the default wheel would pull several GB of CUDA libraries. Its own layer, before the
# sources, so editing the code does not reinstall it.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY verifiers ./verifiers
COPY swarm ./swarm
COPY node ./node
RUN pip install --no-cache-dir .

FROM python:3.11-slim
# libgmp10: what fastecdsa links against at run time (no compiler, no headers)
RUN apt-get update && apt-get install -y --no-install-recommends libgmp10 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv

# Identity, checkpoints and logs live in /data: mount a volume there so a restarted container resumes as itself.
ENV PATH=/opt/venv/bin:$PATH SWARM_NODE_HOME=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
# relative paths (--metrics, --log-file) land in the volume too
WORKDIR /data
EXPOSE 4001
ENTRYPOINT ["swarm-node"]
CMD ["join", "--model", "tiny"]
