import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hypothesis import Phase, settings

# `pytest --hypothesis-profile=noshrink` reports a failure without minimising it: handy when
# checking that a planted bug is caught.
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])
