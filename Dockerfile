# qsmprep BIDS App image.
#   docker build -t qsmprep .                       (CPU PyTorch)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t qsmprep:cuda .
#   docker run --rm -v /data/bids:/bids:ro -v /data/out:/out qsmprep /bids /out participant
#   apptainer run --cleanenv [--nv] -B /data qsmprep.sif /data/bids /data/out participant
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Threads are passed explicitly (--omp-nthreads); caches live outside $HOME, which
# Apptainer remaps, and outside the read-only image.
ENV OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A virtual environment keeps pip away from any system-managed Python.
RUN python3 -m venv /opt/qsmprep
ENV PATH=/opt/qsmprep/bin:$PATH

RUN pip install "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md /src/
COPY qsmprep /src/qsmprep
RUN pip install /src && rm -rf /src \
    && python -c "import qsmprep.cli.run, qsmprep.nn.unet; print('qsmprep', qsmprep.__version__)"

# The group level's template and atlas (MNI152NLin2009cAsym T1w and brain mask at 2 mm,
# Harvard-Oxford subcortical atlas at 1 mm), fetched at build time into a fixed folder
# outside $HOME (which Apptainer remaps) by the same module that reads them. A build
# without network access passes --build-arg FETCH_TEMPLATES=0; the group level then says
# how to fetch them into a bound TEMPLATEFLOW_HOME.
ARG FETCH_TEMPLATES=1
ENV TEMPLATEFLOW_HOME=/opt/templateflow
RUN mkdir -p "$TEMPLATEFLOW_HOME" \
    && if [ "$FETCH_TEMPLATES" = 1 ]; then \
        pip install templateflow \
        && python -m qsmprep.group.templates fetch \
        && pip uninstall -y templateflow; \
    fi \
    && chmod -R a+rX "$TEMPLATEFLOW_HOME"

# Warm numba's cache at build time would need a writable cache at run time anyway;
# /tmp is writable under docker and apptainer.
WORKDIR /tmp
ENTRYPOINT ["qsmprep"]
CMD ["--help"]
