"""The pieces of scripts/benchmark.py, one concern a module:

- `timing`: the process's clock (for --time-budget), timed calls and their summary;
- `paths`: what each measured path is (its Config, its trainer, its k-step call);
- `steps`: step times, alternating between the paths round by round;
- `children`: the rows measured in processes of their own (peak memory, two host devices);
- `machine`: the process settings, the machine's facts and ceilings, device memory;
- `training`: time to 99.0% through the training loop (`common.loop.EpochLoop`);
- `speedrun`: the `speedrun` preset over several seeds, compilation on the clock;
- `starts`: process starts, with the compilation cache empty and warm;
- `report`: the markdown, the JSON and the speedrun's plot, each written atomically.
"""
