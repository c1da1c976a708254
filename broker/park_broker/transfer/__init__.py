"""Moving files between sites (DESIGN §7): the source serving `Files.Read`, the destination fetching, and fetch jobs."""
