"""The dense reference (:mod:`.reference`) and the rank spawner (:mod:`.ranks`) for tests."""
from ds_twolevel.testing.ranks import *  # noqa: F401,F403
