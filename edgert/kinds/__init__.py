"""The two kinds of model a Runtime loads, above the engines: TaskModel and MoeLM."""
