"""``lorakit serve --ray``: the A1111 API and the page on Ray Serve — model replicas routed by LoRA set, autoscaling,
cluster-wide progress/interrupt/options, and no request lost when a replica dies (``docs/serving.md``).

Modules without Ray: ``config`` (flags → Serve options), ``keys`` (the LoRA-set routing key, switch counts),
``table`` (the job table's logic). With Ray Serve (``pip install 'lorakit[ray]'``): ``replica``, ``queue``,
``state``, ``ingress``, ``deployments`` (the application), ``run`` (the CLI's start and stop).
"""
