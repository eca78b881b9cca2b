"""The kit's demo room: experiments that chain the other rooms, and what they report.

It owns ``roclip demo``'s settings and scales (:mod:`~roclip_kit.demo.settings`), its whole
loop of building, poisoning, training and evaluating (:mod:`~roclip_kit.demo.run`), tensor-path
runs as parallel jobs that train and evaluate every epoch (:mod:`~roclip_kit.demo.runs`, also
the benchmarks' grid), and the figures, verdicts and plot (:mod:`~roclip_kit.demo.report`,
drawn by :mod:`~roclip_kit.demo.plot`).

It may import the core (``roclip_plugin``), ``roclip_torch``'s checkpoint files, the kit's
shared :mod:`roclip_kit.files` and :mod:`roclip_kit.outputs`, and the data, attack, training
and evaluation rooms; never the command room.
"""
