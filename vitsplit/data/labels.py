"""What the tasks are, and the label value that means "no label".

``TASKS``: semantic segmentation, object detection (with instance masks) and monocular depth.
``IGNORE_INDEX``: the segmentation label of pixels that count for neither loss nor metric
(MMSegmentation's convention, 255), also used to pad label maps.
"""

TASKS = ("seg", "det", "depth")
IGNORE_INDEX = 255
