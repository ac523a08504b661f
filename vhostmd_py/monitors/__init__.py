"""What watches the cycle's statistics: alarms, their sinks, accounting and shaping."""
