"""The caches, by name: a new cache is a module with a `ldm.models.diffusion.cache.Cache` subclass and one entry
here. Everything else (flags, mode strings, labels, records, FLOP counting, compiling, the batch-size probe)
reads the class."""
from ldm.models.diffusion.adaptive import AdaptiveDeepCache
from ldm.models.diffusion.cache import NoCache
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.faster_diffusion import FasterDiffusion

CACHES = {cache.name: cache for cache in (NoCache, FasterDiffusion, DeepCache, AdaptiveDeepCache)}
