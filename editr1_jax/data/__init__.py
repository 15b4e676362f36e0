"""Edit-R1 datasets: folder format -> validated records -> tfds array_record -> grouped epochs."""
