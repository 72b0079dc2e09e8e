//! Exports the right handler but also imports `realm:forbidden/net`, which no host grants.

wit_bindgen::generate!({
    inline: r#"
        package realm:forbidden;
        interface net { connect: func(addr: string) -> u32; }
        world bad {
            import net;
            export realm:llm/handler@0.1.0;
        }
    "#,
    path: "../../wit",
    generate_all,
});

struct Bad;

impl exports::realm::llm::handler::Guest for Bad {
    fn handle(request: String) -> Result<String, String> {
        Ok(realm::forbidden::net::connect(&request).to_string())
    }
}

export!(Bad);
