# qsmprep BIDS App image (docs/usage.md, "Containers").
#
#   docker build -t qsmprep .                                         CPU PyTorch
#   docker build --build-arg TORCH_VARIANT=cu126 -t qsmprep:cuda .    CUDA PyTorch (--gpus all)
#   docker build --target sim -t qsmprep:sim .                        + the phantom simulator
#   docker build --build-arg FETCH_TEMPLATES=0 -t qsmprep .           offline: no templates
#   docker run --rm --read-only --tmpfs /tmp -v /data/bids:/bids:ro -v /data/out:/out \
#       qsmprep /bids /out participant
#
# Stages: os (Python, settings, user), build (os + pinned dependencies + qsmprep in
# /opt/qsmprep), templates (the group level's template and atlas, fetched into
# /opt/templateflow), sim (build + the simulator extra; it compiles numba's cache by running
# the pipeline on a phantom, and is the demo image) and runtime (os + build's /opt/qsmprep
# + the templates + that cache, no simulator, no build leftovers: the default target).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS os
# Threads are passed explicitly (--omp-nthreads). numba's cache is compiled at build time
# (sim stage) for a generic x86-64 CPU and served read-only to any user by
# qsmprep.numba_cache; nothing is written to HOME, which may be missing or shared.
ENV PATH=/opt/qsmprep/bin:$PATH \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    NUMBA_CPU_NAME=generic \
    QSMPREP_NUMBA_CACHE=/opt/qsmprep/numba-cache \
    NUMBA_CACHE_LOCATOR_CLASSES=qsmprep.numba_cache.SeededCacheLocator,UserProvidedCacheLocator,InTreeCacheLocator,UserWideCacheLocator \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 1000 --user-group --create-home --home-dir /home/qsmprep qsmprep
WORKDIR /tmp
ENTRYPOINT ["qsmprep"]
CMD ["--help"]


FROM os AS build
ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA variant for which PyTorch publishes TORCH_VERSION (e.g. cu126); an empty
# TORCH_INDEX takes torch from the default index only.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
RUN python3 -m venv /opt/qsmprep
# Every dependency at the version pinned in constraints.txt (make constraints).
COPY constraints.txt /opt/qsmprep/constraints.txt
RUN pip install -c /opt/qsmprep/constraints.txt "torch==${TORCH_VERSION}" \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
COPY pyproject.toml README.md /src/
COPY qsmprep /src/qsmprep
RUN pip install -c /opt/qsmprep/constraints.txt /src && rm -rf /src \
    && qsmprep --version
# What a run never loads: PyTorch's C++ headers and test binaries, test suites.
RUN cd /opt/qsmprep/lib/python3*/site-packages \
    && rm -rf torch/include torch/test pandas/tests numba/tests matplotlib/tests \
    && qsmprep --version


FROM build AS templates
# The group level's template and atlas (MNI152NLin2009cAsym T1w and brain mask at 2 mm,
# Harvard-Oxford subcortical atlas at 1 mm), fetched at build time into TEMPLATEFLOW_HOME,
# a fixed folder outside $HOME (which Apptainer remaps), by the module that reads them,
# with the templateflow package of the 'templates' extra (which stays in this stage). A
# build without network access passes --build-arg FETCH_TEMPLATES=0: the folder is then
# empty, and the group level says how to fetch the files into a bound TEMPLATEFLOW_HOME.
ARG FETCH_TEMPLATES=1
RUN mkdir -p "$TEMPLATEFLOW_HOME" \
    && if [ "$FETCH_TEMPLATES" = 1 ]; then \
        pip install -c /opt/qsmprep/constraints.txt $(python -c "from importlib.metadata \
import requires; print(*(r.split(';')[0] for r in requires('qsmprep') \
if 'extra == \"templates\"' in r))") \
        && python -m qsmprep.group.templates fetch; \
    fi \
    && chmod -R a+rX "$TEMPLATEFLOW_HOME"


FROM build AS sim
# The simulator extra (qsmprep.sim, qsmprep-demo), as pyproject.toml lists it.
RUN pip install -c /opt/qsmprep/constraints.txt $(python -c "from importlib.metadata import \
requires; print(*(r.split(';')[0] for r in requires('qsmprep') if 'extra == \"sim\"' in r))")
# Compile numba's cache: run the pipeline on a 4 mm phantom with every background removal
# and inversion method of the registries (pairwise), then the other options that compile,
# and the U-Net (which checks that the slimmed PyTorch runs), MCPC-3D-S's coarse-grid
# smoothing, which a 4 mm phantom does not reach (it runs where sigma spans 2+ voxels),
# and the parallel phase wrap and scaling (arrays of 2^16 values and more; the scaling
# for each stored type scanners use).
RUN set -e; export NUMBA_CACHE_DIR="$QSMPREP_NUMBA_CACHE"; d=$(mktemp -d); \
    python -m qsmprep.sim "$d/bids" --preset small > /dev/null; \
    python -c "from qsmprep.config import method_choices; c = method_choices(); \
b = c['bf_removal']; i = [m for m in c['inversion'] if m != 'adaptive-unet']; \
[print('--bf-removal', b[k % len(b)], '--inversion', i[k % len(i)]) \
for k in range(max(len(b), len(i)))]; \
print('--two-pass --r2star arlo --swi'); print('--unwrapping laplacian --r2star loglinear'); \
print('--inversion adaptive-unet')" \
    > "$d/options"; \
    while read -r opts; do \
        echo "warming numba's cache: qsmprep ... $opts"; \
        qsmprep "$d/bids" "$d/out" participant -w "$d/work" --nprocs 1 \
            --skip-bids-validation $opts 2> "$d/log" || { cat "$d/log"; exit 1; }; \
    done < "$d/options"; \
    python -c "import numpy as n; from qsmprep.qsm.phase import smooth_angle as s, wrap as w, \
scale_phase as p; s(n.zeros((9, 9, 9), 'f4'), n.ones((9, 9, 9), 'f4'), (4, 4, 4)); \
w(n.zeros(1 << 16, 'f4')); [p(n.zeros(1 << 16, t), scale=1.0) for t in ('f4', 'f8', 'i2', 'u2')]"; \
    rm -rf "$d"; chmod -R a+rX "$QSMPREP_NUMBA_CACHE"; ls -R "$QSMPREP_NUMBA_CACHE"
USER qsmprep


FROM os AS runtime
COPY --from=build /opt/qsmprep /opt/qsmprep
COPY --from=templates /opt/templateflow /opt/templateflow
COPY --from=sim /opt/qsmprep/numba-cache /opt/qsmprep/numba-cache
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="Quantitative susceptibility mapping from multi-echo GRE, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.licenses="Apache-2.0"
USER qsmprep
