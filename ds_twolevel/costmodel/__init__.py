"""Cost model: the collectives a call issues (:mod:`.traffic`), FLOPs/bytes/time of a whole model
(:mod:`.roofline`), hardware profiles (:mod:`.hardware`) and the layout planner (:mod:`.planner`)."""
from ds_twolevel.costmodel.roofline import *  # noqa: F401,F403
from ds_twolevel.costmodel.traffic import *  # noqa: F401,F403
