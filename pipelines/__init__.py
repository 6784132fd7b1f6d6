"""The stages of actstore as plain functions taking one config each: harvest, train, groups, lora, eval."""
