"""The group level: QC table over runs, template registration (DIPY) and deep grey ROIs.

See :mod:`qsmprep.group.level` (the runner), :mod:`qsmprep.group.registration` and
:mod:`qsmprep.group.templates` (the offline TemplateFlow files).
"""
