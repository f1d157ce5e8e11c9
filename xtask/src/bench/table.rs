//! The one Markdown table writer of the benchmarks, and what a scenario hands to the report.
//!
//! Every table of `bench.md` goes through [`Table`], so that all share one layout (header,
//! separator, rows, each cell padded by one space) and a scenario only says what its cells
//! hold.

use std::fmt::{Display, Write as _};

use serde_json::Value;

/// A Markdown table being written: a header row and its separator, then rows.
pub struct Table(String);

impl Table {
    /// A table with these column headings.
    pub fn new<S: Display>(header: impl IntoIterator<Item = S>) -> Self {
        let mut t = Self(String::new());
        let columns = t.push(header);
        t.push((0..columns).map(|_| "---"));
        t
    }

    /// More rows of a table whose header was written already (rows printed as they come).
    pub fn rows() -> Self {
        Self(String::new())
    }

    /// Adds a row (as many cells as the header has, by convention; not checked).
    pub fn row<S: Display>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.push(cells);
    }

    /// Writes `| a | b |` and returns the number of cells.
    fn push<S: Display>(&mut self, cells: impl IntoIterator<Item = S>) -> usize {
        let mut n = 0;
        self.0.push('|');
        for c in cells {
            let _ = write!(self.0, " {c} |");
            n += 1;
        }
        self.0.push('\n');
        n
    }

    /// The table's Markdown, every line ending in a newline.
    pub fn finish(self) -> String {
        self.0
    }
}

/// What one scenario hands to the report: its entries of `bench.json`'s `scenarios` object and
/// its blocks of `bench.md` (tables and notes, each ending in a newline; the report separates
/// blocks with a blank line).
#[derive(Default)]
pub struct Section {
    pub json: Vec<(&'static str, Value)>,
    pub md: Vec<String>,
}

impl Section {
    pub fn json(mut self, key: &'static str, value: Value) -> Self {
        self.json.push((key, value));
        self
    }

    pub fn md(mut self, block: impl Into<String>) -> Self {
        self.md.push(block.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_has_a_header_a_separator_and_rows() {
        let mut t = Table::new(["a", "b c"]);
        t.row([1.to_string(), "x".into()]);
        assert_eq!(t.finish(), "| a | b c |\n| --- | --- |\n| 1 | x |\n");
    }
}
