"""Monitoring of ``serve``: metrics (:mod:`~dicom_node.monitoring.metrics`), health checks
(:mod:`~dicom_node.monitoring.health`), worker ready reports (:mod:`~dicom_node.monitoring.readiness`),
wired together and served over HTTP by :class:`~dicom_node.monitoring.monitor.Monitor`."""
