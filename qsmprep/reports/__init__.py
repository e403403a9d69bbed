"""Reports: QC figures and numbers, the participant and group HTML pages, methods boilerplate.

They read what the workflows wrote (outputs, sidecars, log folders) and never compute
QSM; QC numbers that need the forward model call :mod:`qsmprep.qsm` on the outputs.
"""
