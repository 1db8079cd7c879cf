//! Health checking (to be written): tcp / http / command checkers and the rise/fall state
//! machine. Reports verdicts; never writes maps.
