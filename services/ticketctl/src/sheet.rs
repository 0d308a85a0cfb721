//! `ticketctl sheet`: a district's meter-box labels, as printable SVG pages.
//!
//! The seeds' first lesson: a customer who can reach their own district
//! manager is served in one call. Each label puts the first line in reach:
//! the district manager's number, the station's duty number, the company's
//! supervision line, and a QR code to report a fault online for that very
//! account. Pages are A4 (210 × 297 mm), [`COLUMNS`] × [`ROWS`] labels each,
//! one file per page (`<district>-p01.svg`, …), ready to print on label
//! sheets or convert to PDF with any SVG tool.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lineguard_protos::routing::v1::{
    Contact, ListDistrictAccountsRequest, WhoServesRequest, WhoServesResponse,
};
use qrcode::{Color, EcLevel, QrCode};

use crate::Error;
use crate::endpoints::Clients;

/// Labels across a page.
pub const COLUMNS: usize = 3;
/// Labels down a page.
pub const ROWS: usize = 8;
/// Accounts a sheet is made for at most (a district has a few hundred).
pub const MAX_ACCOUNTS: usize = 20_000;

const PAGE_WIDTH_MM: f64 = 210.0;
const PAGE_HEIGHT_MM: f64 = 297.0;
const MARGIN_MM: f64 = 8.0;
const QR_SIZE_MM: f64 = 26.0;

/// What every label of a district shows but the account.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelInfo {
    pub district_name: String,
    pub manager: Option<Contact>,
    pub station: Option<Contact>,
    pub company: Option<Contact>,
    /// The online report address; the account is appended as `?account=`.
    pub report_url: String,
}

impl LabelInfo {
    /// From routing's answer to `WhoServes` for the district.
    pub fn from_who_serves(who: WhoServesResponse, report_url: &str) -> LabelInfo {
        LabelInfo {
            district_name: who.district_name,
            manager: who.manager,
            station: who.station,
            company: who.company,
            report_url: report_url.to_string(),
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn phone_line(title: &str, contact: Option<&Contact>) -> String {
    match contact {
        Some(c) if !c.phone.is_empty() => format!("{title}: {} {}", c.name, c.phone),
        Some(c) => format!("{title}: {} (no number on file)", c.name),
        None => format!("{title}: -"),
    }
}

/// The report address of one account (its QR code's content).
pub fn report_link(base: &str, account: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}account={account}")
}

/// A QR code drawn as one SVG path of unit squares, `size_mm` wide, at
/// (`x_mm`, `y_mm`).
fn qr_path(content: &str, x_mm: f64, y_mm: f64, size_mm: f64) -> Result<String, Error> {
    let code = QrCode::with_error_correction_level(content.as_bytes(), EcLevel::M)
        .map_err(|e| Error::Usage(format!("QR code of {content:?}: {e}")))?;
    let width = code.width();
    // Four modules of quiet zone each side, as scanners expect.
    let modules = width + 8;
    let scale = size_mm / modules as f64;
    let mut d = String::new();
    for (i, color) in code.to_colors().into_iter().enumerate() {
        if color == Color::Dark {
            let (col, row) = (i % width + 4, i / width + 4);
            let _ = write!(d, "M{col} {row}h1v1h-1z");
        }
    }
    Ok(format!(
        "<path transform=\"translate({x_mm:.2} {y_mm:.2}) scale({scale:.4})\" d=\"{d}\" fill=\"#000\"/>"
    ))
}

/// One label: the account, the three lines' numbers, the QR code.
fn label(
    info: &LabelInfo,
    account: &str,
    x_mm: f64,
    y_mm: f64,
    w_mm: f64,
    h_mm: f64,
) -> Result<String, Error> {
    let mut out = String::new();
    let _ = write!(
        out,
        "<g class=\"label\"><rect x=\"{x_mm:.2}\" y=\"{y_mm:.2}\" width=\"{w_mm:.2}\" height=\"{h_mm:.2}\" \
         fill=\"none\" stroke=\"#999\" stroke-width=\"0.2\" stroke-dasharray=\"1 1\"/>"
    );
    let text_x = x_mm + 2.0;
    let lines = [
        (
            format!("{} · account {account}", info.district_name),
            "bold",
        ),
        (phone_line("Manager", info.manager.as_ref()), "normal"),
        (phone_line("Station", info.station.as_ref()), "normal"),
        (phone_line("Supervision", info.company.as_ref()), "normal"),
        ("Scan to report a fault".to_string(), "normal"),
    ];
    for (i, (text, weight)) in lines.iter().enumerate() {
        let _ = write!(
            out,
            "<text x=\"{text_x:.2}\" y=\"{:.2}\" font-family=\"sans-serif\" font-size=\"2.3\" \
             font-weight=\"{weight}\">{}</text>",
            y_mm + 5.0 + i as f64 * 4.2,
            escape(text)
        );
    }
    let qr_size = QR_SIZE_MM.min(h_mm - 4.0);
    out.push_str(&qr_path(
        &report_link(&info.report_url, account),
        x_mm + w_mm - qr_size - 1.0,
        y_mm + (h_mm - qr_size) / 2.0,
        qr_size,
    )?);
    out.push_str("</g>");
    Ok(out)
}

/// The SVG pages of `accounts`' labels, [`COLUMNS`] × [`ROWS`] a page.
pub fn render_pages(info: &LabelInfo, accounts: &[String]) -> Result<Vec<String>, Error> {
    let per_page = COLUMNS * ROWS;
    let label_w = (PAGE_WIDTH_MM - 2.0 * MARGIN_MM) / COLUMNS as f64;
    let label_h = (PAGE_HEIGHT_MM - 2.0 * MARGIN_MM) / ROWS as f64;
    let mut pages = Vec::with_capacity(accounts.len().div_ceil(per_page));
    for chunk in accounts.chunks(per_page) {
        let mut svg = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
             width=\"{PAGE_WIDTH_MM}mm\" height=\"{PAGE_HEIGHT_MM}mm\" \
             viewBox=\"0 0 {PAGE_WIDTH_MM} {PAGE_HEIGHT_MM}\">\n"
        );
        for (i, account) in chunk.iter().enumerate() {
            let (col, row) = (i % COLUMNS, i / COLUMNS);
            svg.push_str(&label(
                info,
                account,
                MARGIN_MM + col as f64 * label_w,
                MARGIN_MM + row as f64 * label_h,
                label_w,
                label_h,
            )?);
            svg.push('\n');
        }
        svg.push_str("</svg>\n");
        pages.push(svg);
    }
    Ok(pages)
}

/// Asks routing for the district's contacts and accounts, writes the pages
/// into `out_dir`, and returns their paths.
pub async fn write_sheet(
    clients: &Clients,
    district_id: &str,
    report_url: &str,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    let mut routing = clients.routing();
    let who = routing
        .who_serves(WhoServesRequest {
            district_id: district_id.to_string(),
            ..WhoServesRequest::default()
        })
        .await
        .map_err(Error::service("routing"))?
        .into_inner();
    let mut accounts = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = routing
            .list_district_accounts(ListDistrictAccountsRequest {
                district_id: district_id.to_string(),
                page_size: 1_000,
                page_token: page_token.clone(),
            })
            .await
            .map_err(Error::service("routing"))?
            .into_inner();
        accounts.extend(page.account_numbers);
        if accounts.len() > MAX_ACCOUNTS {
            return Err(Error::TooBig(format!(
                "district {district_id} has over {MAX_ACCOUNTS} accounts"
            )));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let info = LabelInfo::from_who_serves(who, report_url);
    let pages = render_pages(&info, &accounts)?;
    std::fs::create_dir_all(out_dir)?;
    let mut paths = Vec::with_capacity(pages.len());
    for (i, page) in pages.iter().enumerate() {
        let path = out_dir.join(format!("{district_id}-p{:02}.svg", i + 1));
        std::fs::write(&path, page)?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lineguard_protos::routing::v1::AssigneeRole;

    fn contact(line: u32, name: &str, phone: &str) -> Option<Contact> {
        Some(Contact {
            line,
            role: AssigneeRole::DistrictManager as i32,
            id: format!("id-{line}"),
            name: name.into(),
            phone: phone.into(),
        })
    }

    fn info() -> LabelInfo {
        LabelInfo {
            district_name: "Riverside <No. 2> & Co".into(),
            manager: contact(1, "Xu Lei", "139-0000-0001"),
            station: contact(2, "Chengguan Station", "0939-5210001"),
            company: contact(3, "Lixian County Power Supply Company", ""),
            report_url: "https://95598.example.cn/report".into(),
        }
    }

    #[test]
    fn every_account_gets_a_label_with_the_three_lines_and_a_qr_code() {
        let accounts: Vec<String> = (0..30).map(|i| format!("31000{i:05}")).collect();
        let pages = render_pages(&info(), &accounts).expect("render");
        assert_eq!(pages.len(), 2, "24 labels a page");
        let labels: usize = pages
            .iter()
            .map(|p| p.matches("class=\"label\"").count())
            .sum();
        assert_eq!(labels, 30);
        let qr_codes: usize = pages.iter().map(|p| p.matches("<path ").count()).sum();
        assert_eq!(qr_codes, 30);
        for account in &accounts {
            assert!(
                pages
                    .iter()
                    .any(|p| p.contains(&format!("account {account}")))
            );
        }
        let first = &pages[0];
        assert!(first.contains("Manager: Xu Lei 139-0000-0001"));
        assert!(first.contains("Station: Chengguan Station 0939-5210001"));
        assert!(
            first.contains("(no number on file)"),
            "a missing number says so"
        );
        assert!(
            first.contains("Riverside &lt;No. 2&gt; &amp; Co"),
            "text is escaped"
        );
        assert!(first.starts_with("<?xml"));
    }

    #[test]
    fn the_qr_code_holds_the_account_s_report_link() {
        assert_eq!(
            report_link("https://x.cn/report", "123"),
            "https://x.cn/report?account=123"
        );
        assert_eq!(
            report_link("https://x.cn/r?src=box", "123"),
            "https://x.cn/r?src=box&account=123"
        );
        // The drawn modules are the code's dark modules, quiet zone added.
        let content = report_link("https://x.cn/report", "123");
        let code =
            QrCode::with_error_correction_level(content.as_bytes(), EcLevel::M).expect("code");
        let dark = code
            .to_colors()
            .iter()
            .filter(|c| **c == Color::Dark)
            .count();
        let path = qr_path(&content, 0.0, 0.0, 26.0).expect("path");
        assert_eq!(path.matches('M').count(), dark);
    }
}
