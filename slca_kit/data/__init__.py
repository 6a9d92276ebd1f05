"""Image sources, class-incremental scenarios and the reference transforms."""
from .scenario import Scenario, build_scenario, reference_class_order
from .sources import ImageSplit, LoadedData, load_data

__all__ = ["ImageSplit", "LoadedData", "Scenario", "build_scenario", "load_data", "reference_class_order"]
