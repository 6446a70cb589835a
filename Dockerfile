# CPU image of swarm-node. Real models on GPUs: see the `gpu` profile in docker-compose.yml (it swaps the torch build).
FROM python:3.11-slim

# fastecdsa (py-libp2p) compiles against GMP.
RUN apt-get update && apt-get install -y --no-install-recommends libgmp-dev gcc && rm -rf /var/lib/apt/lists/*

# The CPU build of torch: the default wheel would pull several GB of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY verifiers ./verifiers
COPY swarm ./swarm
COPY node ./node
RUN pip install --no-cache-dir .

# Identity, checkpoints and logs live in /data: mount a volume there so a restarted container resumes as itself.
ENV SWARM_NODE_HOME=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 4001
ENTRYPOINT ["swarm-node"]
CMD ["join", "--model", "tiny"]
