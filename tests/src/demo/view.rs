//! How the live traffic is shown: on a terminal, a small table redrawn in place with ANSI
//! cursor movement; anywhere else (CI logs, pipes), one plain line per second.
//! Events (a failure, a state change) are printed above the table / between the lines.

use std::io::Write;
use std::time::Duration;

/// One master's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterRow {
    pub name: String,
    pub address: String,
    /// What mim-lb says: `up`, `down`, ... (`?` before the first status).
    pub state: String,
    /// Answers since the traffic started.
    pub total: u64,
    /// Answers in the last second.
    pub last_second: u64,
}

/// What the live view shows at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Since the traffic started.
    pub elapsed: Duration,
    /// The requests per second asked for (the bars' full scale).
    pub rate: u32,
    pub requests: u64,
    pub failed: u64,
    pub last_second_requests: u64,
    pub last_second_failed: u64,
    pub masters: Vec<MasterRow>,
}

/// A way to show traffic live.
pub trait LiveView {
    /// Starts a new table (a new phase of the story).
    fn begin(&mut self);
    /// Shows the traffic as it is now; called several times a second.
    fn frame(&mut self, frame: &Frame);
    /// A line that stays, printed above the table.
    fn event(&mut self, line: &str);
    /// Leaves the last frame on screen; later output goes below it.
    fn end(&mut self);
}

/// The width of the terminal on stdout, if it is one.
pub fn terminal_width() -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills a winsize and nothing else; a zeroed one is valid.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// `line` cut to `width` character cells, with `…` where it was cut: wrapped lines would
/// break the layout of text meant to be read as columns.
pub fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The view for stdout: live on a terminal, plain otherwise.
pub fn for_stdout(live: bool) -> Box<dyn LiveView> {
    if live { Box::new(TerminalView::default()) } else { Box::new(PlainView::new()) }
}

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// Widest bar, in character cells (for a master taking every request).
const BAR_CELLS: u64 = 25;

fn state_color(state: &str) -> &'static str {
    match state {
        "up" => GREEN,
        "draining" | "disabled" => YELLOW,
        _ => RED,
    }
}

/// A bar of `count` out of `full`, in eighths of a cell.
pub fn bar(count: u64, full: u64) -> String {
    const PARTS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (count.min(full) * BAR_CELLS * 8).checked_div(full).unwrap_or(0);
    let mut s = "█".repeat((eighths / 8) as usize);
    if !eighths.is_multiple_of(8) {
        s.push(PARTS[(eighths % 8) as usize]);
    }
    s
}

/// The table, one string per line, with colors.
pub fn table(frame: &Frame) -> Vec<String> {
    let failed_color = if frame.last_second_failed > 0 { RED } else { "" };
    let mut lines = vec![
        format!(
            "  {BOLD}{:>6.1} s{RESET}   requests {:>6}   {failed_color}failed {:>4}{RESET}   last second: {} sent, {failed_color}{} failed{RESET}",
            frame.elapsed.as_secs_f64(),
            frame.requests,
            frame.failed,
            frame.last_second_requests,
            frame.last_second_failed,
        ),
        format!("  {DIM}{:<10} {:<15} {:<8} {:>8}   last second{RESET}", "master", "address", "mim-lb", "answered"),
    ];
    for m in &frame.masters {
        lines.push(format!(
            "  {:<10} {:<15} {}{:<8}{RESET} {:>8}   {:>3} {}",
            m.name,
            m.address,
            state_color(&m.state),
            m.state,
            m.total,
            m.last_second,
            bar(m.last_second, u64::from(frame.rate)),
        ));
    }
    lines
}

/// Redraws the table in place. The cursor is hidden while the table is live and shown again
/// on [`LiveView::end`] or drop (also when the demo unwinds after Ctrl-C). Write errors are
/// ignored: a closed stdout must not turn into a panic while the lab is being removed.
#[derive(Default)]
pub struct TerminalView {
    /// Lines of the table currently on screen, below any events.
    drawn: usize,
    last: Option<Frame>,
}

impl TerminalView {
    fn erase(&mut self, out: &mut impl Write) {
        if self.drawn > 0 {
            // Up to the table's first line, then clear to the end of the screen.
            let _ = write!(out, "\x1b[{}A\r\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    fn draw(&mut self, out: &mut impl Write) {
        if let Some(frame) = &self.last {
            let lines = table(frame);
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
            self.drawn = lines.len();
        }
    }
}

impl LiveView for TerminalView {
    fn begin(&mut self) {
        self.drawn = 0;
        self.last = None;
        show_cursor(false);
    }

    fn frame(&mut self, frame: &Frame) {
        let mut out = std::io::stdout().lock();
        self.erase(&mut out);
        self.last = Some(frame.clone());
        self.draw(&mut out);
        let _ = out.flush();
    }

    fn event(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        self.erase(&mut out);
        let _ = writeln!(out, "{line}");
        self.draw(&mut out);
        let _ = out.flush();
    }

    fn end(&mut self) {
        self.drawn = 0;
        self.last = None;
        show_cursor(true);
    }
}

impl Drop for TerminalView {
    fn drop(&mut self) {
        show_cursor(true);
    }
}

fn show_cursor(show: bool) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", if show { "\x1b[?25h" } else { "\x1b[?25l" });
    let _ = out.flush();
}

/// One line per second of traffic, under a header printed at the start of each phase.
pub struct PlainView {
    header_due: bool,
    /// The next whole second of `elapsed` to print a line for.
    next_second: u64,
    /// Totals at the last printed line, to print per-second numbers.
    printed: Option<Frame>,
}

impl PlainView {
    pub fn new() -> PlainView {
        PlainView { header_due: true, next_second: 1, printed: None }
    }
}

impl Default for PlainView {
    fn default() -> Self {
        PlainView::new()
    }
}

/// The per-second line: time, requests and failures in that second, each master's answers in
/// that second and its state.
pub fn plain_row(frame: &Frame, previous: Option<&Frame>) -> String {
    let before = |f: fn(&Frame) -> u64| previous.map_or(0, f);
    let mut line = format!(
        "  {:>6.1}s {:>6} {:>7} ",
        frame.elapsed.as_secs_f64(),
        frame.requests - before(|f| f.requests),
        frame.failed - before(|f| f.failed),
    );
    for (k, m) in frame.masters.iter().enumerate() {
        let prev = previous.and_then(|p| p.masters.get(k)).map_or(0, |p| p.total);
        line += &format!("  {:>4} {:<8}", m.total - prev, m.state);
    }
    line.trim_end().to_owned()
}

/// The header over [`plain_row`] lines.
pub fn plain_header(frame: &Frame) -> String {
    let mut line = format!("  {:>7} {:>6} {:>7} ", "time", "req/s", "failed");
    for m in &frame.masters {
        line += &format!("  {:<13}", m.name);
    }
    line.trim_end().to_owned()
}

impl LiveView for PlainView {
    fn begin(&mut self) {
        self.header_due = true;
    }

    fn frame(&mut self, frame: &Frame) {
        let second = frame.elapsed.as_secs();
        if second < self.next_second {
            return;
        }
        if self.header_due {
            println!("{}", plain_header(frame));
            self.header_due = false;
        }
        println!("{}", plain_row(frame, self.printed.as_ref()));
        self.printed = Some(frame.clone());
        self.next_second = second + 1;
    }

    fn event(&mut self, line: &str) {
        println!("{line}");
    }

    fn end(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(secs: f64, requests: u64, failed: u64, totals: [u64; 2], states: [&str; 2]) -> Frame {
        Frame {
            elapsed: Duration::from_secs_f64(secs),
            rate: 50,
            requests,
            failed,
            last_second_requests: 50,
            last_second_failed: 0,
            masters: (0..2)
                .map(|k| MasterRow {
                    name: format!("master-{}", k + 1),
                    address: format!("10.0.0.1{}", k + 1),
                    state: states[k].into(),
                    total: totals[k],
                    last_second: 25,
                })
                .collect(),
        }
    }

    #[test]
    fn long_lines_are_cut_to_fit() {
        assert_eq!(fit("abcdef", 6), "abcdef");
        assert_eq!(fit("abcdefg", 6), "abcde…");
        assert_eq!(fit("ééé", 2), "é…");
    }

    #[test]
    fn bars_are_proportional_in_eighths() {
        assert_eq!(bar(0, 50), "");
        assert_eq!(bar(50, 50), "█".repeat(25));
        assert_eq!(bar(100, 50), "█".repeat(25), "capped at the full scale");
        assert_eq!(bar(1, 50), "▌"); // 25*8/50 = 4 eighths
        assert_eq!(bar(3, 0), "");
    }

    #[test]
    fn plain_rows_show_per_second_numbers_and_states() {
        let first = frame(1.0, 50, 0, [25, 25], ["up", "up"]);
        let second = frame(2.0, 100, 3, [47, 50], ["down", "up"]);
        assert_eq!(plain_header(&first), "     time  req/s  failed   master-1       master-2");
        assert_eq!(plain_row(&first, None), "     1.0s     50       0     25 up          25 up");
        assert_eq!(plain_row(&second, Some(&first)), "     2.0s     50       3     22 down        25 up");
    }

    #[test]
    fn the_table_has_a_line_per_master_and_stays_narrow() {
        let lines = table(&frame(1.0, 50, 0, [25, 25], ["up", "down"]));
        assert_eq!(lines.len(), 4);
        assert!(lines[3].contains("master-2") && lines[3].contains("down"));
        for line in &lines {
            // Escape sequences take no cells; what is left must fit an 80-column terminal, or
            // the cursor movement that redraws the table would be off by the wrapped lines.
            let visible = strip_ansi(line);
            assert!(visible.chars().count() <= 80, "{visible:?} is {} wide", visible.chars().count());
        }
    }

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}
