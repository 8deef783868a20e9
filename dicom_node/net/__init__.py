"""The DICOM network face: the Storage SCP and its admission (:mod:`.scp`), the connection guard below
pynetdicom (:mod:`.transport`), the C-STORE SCU that delivers outputs (:mod:`.scu`), C-ECHO (:mod:`.echo`),
and the TLS and socket settings both directions share (:mod:`.tls`).  DIMSE statuses by name live in
:mod:`vocab.dimse`."""
