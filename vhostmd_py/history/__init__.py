"""History of the host and every VM: derived rates, RRD files, published consolidations.

Modules: ``rates`` (pure derived values and THE counter semantics),
``consolidate`` (trailing averages), ``rrd`` (the rrdtool store), ``index``
(uuid -> name), ``publish`` (metrics for guests), ``core`` (the daemon's
:class:`~vhostmd_py.history.core.History`), ``ctl`` (the vhostmdctl command).
Only ``rrd``, ``core`` and ``ctl`` need the rrdtool binding (the host extra).
"""
