"""The node's HTTP face: one WSGI application (:mod:`~dicom_node.web.app`) served by waitress in a thread
(:mod:`~dicom_node.web.listener`).  Today ``/metrics`` and ``/healthz``; a DICOMweb service joins as more routes."""
