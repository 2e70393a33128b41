"""``raypo report``: a run or sweep directory turned into one shareable page (Markdown or self-contained
HTML) with the config, the loss and metric curves, the eval table per dimension, the data report, timings
and the export path. Reads only files the trainer and the sweep driver write; never starts Ray.

* :mod:`raypo.report.artifacts`: what a run or sweep directory holds, loaded and checked.
* :mod:`raypo.report.plots`: the curves as PNG images.
* :mod:`raypo.report.render`: the page.
"""
