"""Model configs shipped with safespec and registered with open_clip."""
