//! CSV with a header, as PowerShell's `Export-Csv` writes it from
//! `Get-Recipient | Select PrimarySmtpAddress, @{n='EmailAddresses';e={$_.EmailAddresses -join ';'}}, RecipientTypeDetails`.
//!
//! Columns are found by name (case-insensitive): `PrimarySmtpAddress` (required),
//! `EmailAddresses` (`SMTP:`/`smtp:` prefixed, joined by `;`), `RecipientTypeDetails`.
//! This covers what the directory cannot return: dynamic distribution groups, public folders.

use std::sync::Arc;

use super::{
    Diagnostic, Entry, Format, Location, SourceData, SourceError, directory_address, join_key,
};
use crate::directory::Kind;

/// Map Exchange's `RecipientTypeDetails` names to kinds.
pub fn kind_from_type(t: &str) -> Option<Kind> {
    let t = t.trim().to_ascii_lowercase();
    Some(match t.as_str() {
        "" | "usermailbox" | "linkedmailbox" | "mailuser" | "remoteusermailbox"
        | "guestmailuser" => Kind::User,
        "sharedmailbox"
        | "roommailbox"
        | "equipmentmailbox"
        | "schedulingmailbox"
        | "remotesharedmailbox"
        | "remoteroommailbox"
        | "remoteequipmentmailbox" => Kind::Shared,
        "mailcontact" => Kind::Contact,
        "mailuniversaldistributiongroup"
        | "mailuniversalsecuritygroup"
        | "mailnonuniversalgroup"
        | "dynamicdistributiongroup"
        | "groupmailbox"
        | "roomlist" => Kind::Group,
        "publicfolder" | "publicfoldermailbox" => Kind::PublicFolder,
        _ => return None,
    })
}

/// Parse an `Export-Csv` file. `Err` when the header lacks `PrimarySmtpAddress`.
pub fn parse(name: &Arc<str>, text: &str) -> Result<SourceData, SourceError> {
    let mut out = SourceData::new(name, Format::Csv);
    // Windows PowerShell writes a `#TYPE ...` line before the header; skip such lines but
    // keep counting them, so line numbers match the file.
    let mut skipped = 0u32;
    let mut body = text;
    while body.starts_with('#') {
        body = body.split_once('\n').map_or("", |(_, rest)| rest);
        skipped += 1;
    }
    let mut rdr = ::csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(body.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| {
            SourceError::Refused(
                Location::new(name, 1, 0),
                format!("unreadable CSV header: {e}"),
            )
        })?
        .clone();
    let header_line = skipped + 1;
    let col = |want: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(want))
    };
    let Some(primary_col) = col("PrimarySmtpAddress") else {
        return Err(SourceError::Refused(
            Location::new(name, header_line, 0),
            "CSV header has no PrimarySmtpAddress column".into(),
        ));
    };
    let addrs_col = col("EmailAddresses");
    let type_col = col("RecipientTypeDetails");

    // The csv crate reports a record's start before a CRLF's '\n'; count lines ourselves.
    let bytes = body.as_bytes();
    let (mut seen_byte, mut seen_line) = (0usize, 1u32);
    let mut line_of = |pos: Option<&::csv::Position>| -> u32 {
        let Some(p) = pos else { return 0 };
        let mut b = (p.byte() as usize).min(bytes.len());
        while b < bytes.len() && matches!(bytes[b], b'\r' | b'\n') {
            b += 1;
        }
        if b >= seen_byte {
            seen_line += bytes[seen_byte..b].iter().filter(|&&c| c == b'\n').count() as u32;
            seen_byte = b;
        }
        seen_line + skipped
    };
    for rec in rdr.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = line_of(e.position());
                out.diagnostics.push(Diagnostic::error(
                    Location::new(name, line, 0),
                    format!("unreadable CSV record: {e}"),
                ));
                continue;
            }
        };
        let line = line_of(rec.position());
        let at = || Location::new(name, line, 0);
        let field = |c: Option<usize>| c.and_then(|c| rec.get(c)).unwrap_or("").trim();
        let primary_raw = field(Some(primary_col));
        if primary_raw.is_empty() {
            continue;
        }
        let rtype = field(type_col);
        let object = match kind_from_type(rtype) {
            Some(k) => k,
            None => {
                out.diagnostics.push(Diagnostic::warning(
                    at(),
                    format!("unknown RecipientTypeDetails {rtype:?}; treated as a user"),
                ));
                Kind::User
            }
        };
        let (pl, pd) = match directory_address(primary_raw) {
            Ok(p) => p,
            Err((_, why)) => {
                out.diagnostics.push(Diagnostic::error(
                    at(),
                    format!("PrimarySmtpAddress {primary_raw:?}: {why}; row skipped"),
                ));
                continue;
            }
        };
        let owner = join_key(&pl, &pd);
        let mk = |local, domain, owner| Entry::new(local, domain, object, owner, at(), None);
        out.entries.push(mk(pl, pd, None));
        let mut seen = vec![owner.clone()];
        for item in field(addrs_col)
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let addr = match item.split_once(':') {
                Some((p, a)) if p.eq_ignore_ascii_case("smtp") => a,
                Some((_, _)) if !item.contains('@') || item.find(':') < item.find('@') => continue,
                _ => item,
            };
            match directory_address(addr) {
                Ok((l, d)) => {
                    let key = join_key(&l, &d);
                    if !seen.contains(&key) {
                        seen.push(key);
                        out.entries.push(mk(l, d, Some(owner.clone())));
                    }
                }
                Err((_, why)) => out.diagnostics.push(
                    Diagnostic::error(
                        at(),
                        format!("EmailAddresses item {item:?}: {why}; skipped"),
                    )
                    .with_subject(addr),
                ),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_csv_with_type_line_and_quotes() {
        let text = "\u{feff}#TYPE Selected.Microsoft.Exchange.Data.Directory.Management.ReducedRecipient\r\n\
\"PrimarySmtpAddress\",\"EmailAddresses\",\"RecipientTypeDetails\"\r\n\
\"alice@contoso.com\",\"SMTP:alice@contoso.com;smtp:a@contoso.com;X500:/o=x/cn=a\",\"UserMailbox\"\r\n\
\"all-staff@contoso.com\",\"SMTP:all-staff@contoso.com\",\"DynamicDistributionGroup\"\r\n\
\"pf@contoso.com\",\"\",\"PublicFolder\"\r\n\
\"bad address@contoso.com\",\"\",\"UserMailbox\"\r\n";
        let name: Arc<str> = Arc::from("r.csv");
        let text = crate::sources::decode_utf8(&name, text.as_bytes()).expect("utf8");
        let s = parse(&name, text).expect("header ok");
        let got: Vec<(String, Kind)> = s
            .entries
            .iter()
            .map(|e| (format!("{}@{}", e.local, e.domain), e.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alice@contoso.com".into(), Kind::User),
                ("a@contoso.com".into(), Kind::Alias),
                ("all-staff@contoso.com".into(), Kind::Group),
                ("pf@contoso.com".into(), Kind::PublicFolder),
            ]
        );
        assert_eq!(s.entries[3].loc.to_string(), "r.csv:5");
        assert_eq!(s.diagnostics.len(), 1);
        assert!(
            s.diagnostics[0]
                .to_string()
                .starts_with("r.csv:6: error: PrimarySmtpAddress"),
            "{}",
            s.diagnostics[0]
        );
    }

    #[test]
    fn header_without_primary_column_is_refused() {
        let name: Arc<str> = Arc::from("r.csv");
        assert!(matches!(
            parse(&name, "Name,Mail\nx,y\n"),
            Err(SourceError::Refused(..))
        ));
    }
}
