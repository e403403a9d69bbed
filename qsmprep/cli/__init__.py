"""Command-line entry points: ``qsmprep`` (:mod:`.run`) and ``qsmprep-demo`` (:mod:`.demo`)."""
