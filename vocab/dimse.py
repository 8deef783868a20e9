"""C-STORE response statuses (PS3.4 Annex B.2.3) by name: the ones the node answers and the ones it reads."""

from __future__ import annotations

import enum

__all__ = ["CANNOT_UNDERSTAND_CODES", "DOES_NOT_MATCH_CODES", "OUT_OF_RESOURCES_CODES", "WARNING_STATUSES",
           "StoreStatus"]


class StoreStatus(enum.IntEnum):
    """C-STORE statuses by name (0xC230/0xC231 are ours, within "cannot understand")."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    COERCION_OF_DATA_ELEMENTS = 0xB000  # warning
    ELEMENTS_DISCARDED = 0xB006  # warning
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007  # warning
    CANNOT_UNDERSTAND = 0xC000
    UID_IN_ANOTHER_SERIES = 0xC230  # the SOP Instance UID is stored in another series
    UID_WITH_OTHER_CONTENT = 0xC231  # stored with other content, and storage.overwrite_instances = false
    CANCEL = 0xFE00


#: the statuses a C-STORE SCP may answer for a stored instance with a warning
WARNING_STATUSES = frozenset({StoreStatus.COERCION_OF_DATA_ELEMENTS, StoreStatus.ELEMENTS_DISCARDED,
                              StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING})
#: the code families of the failure statuses (0xA7xx, 0xA9xx, 0xCxxx)
OUT_OF_RESOURCES_CODES = range(0xA700, 0xA800)
DOES_NOT_MATCH_CODES = range(0xA900, 0xAA00)
CANNOT_UNDERSTAND_CODES = range(0xC000, 0xD000)
